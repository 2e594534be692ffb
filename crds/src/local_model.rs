//! LocalModelDeployment: a self-hosted model served by Ollama, scaled on gateway demand.

use crate::common::Condition;
use k8s_openapi::api::core::v1::{Affinity, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A self-hosted model served by Ollama on the cluster's GPUs, autoscaled on gateway demand.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "floodgate.dev",
    version = "v1alpha1",
    kind = "LocalModelDeployment",
    plural = "localmodeldeployments",
    shortname = "lmd",
    category = "floodgate",
    namespaced,
    derive = "PartialEq",
    status = "LocalModelDeploymentStatus",
    doc = "A self-hosted model served by Ollama, with GPU resources and autoscaling on queue depth and latency.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(
        name = "Ready Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(name = "Queue", type_ = "integer", json_path = ".status.queueDepth"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.replicas) || !has(self.autoscaling) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)").message("replicas must lie within autoscaling minReplicas..maxReplicas").field_path(".replicas")
)]
pub struct LocalModelDeploymentSpec {
    /// Ollama model tag, e.g. `llama3.1:8b`.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = "^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    )]
    pub model: String,
    /// Serving runtime.
    #[serde(default)]
    pub runtime: Runtime,
    /// Container image of the runtime.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Prompt classes the gateway may send to this model.
    #[schemars(length(min = 1, max = 4))]
    pub classes: Vec<PromptClass>,
    /// Compute per replica.
    #[serde(default)]
    pub resources: ModelResources,
    /// Persistent storage for weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
    /// Replicas when not autoscaled (the scale subresource writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// Autoscaling on gateway demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate. GPU nodes are usually tainted: with `resources.gpu > 0` the
    /// operator adds a toleration of `<gpuResourceName>:NoSchedule` (`Exists`) unless one for
    /// that key is listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity of the pods, as in a pod spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Settings of the Ollama server.
    #[serde(default)]
    pub ollama: OllamaSettings,
}

/// Settings of the Ollama server, passed as its environment variables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OllamaSettings {
    /// Requests one replica serves at once (`OLLAMA_NUM_PARALLEL`); Ollama's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub num_parallel: Option<u32>,
    /// How long the model stays loaded after the last request (`OLLAMA_KEEP_ALIVE`), a
    /// duration such as `5m` or `24h`, or `-1` for ever; Ollama's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^(-1|[0-9]+(\\.[0-9]+)?(ms|s|m|h))$"))]
    pub keep_alive: Option<String>,
}

fn default_image() -> String {
    "ollama/ollama:0.12.6".to_owned()
}

/// Serving runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Ollama.
    #[default]
    Ollama,
}

/// Classes of prompt, as the gateway's classifier assigns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PromptClass {
    /// Short, simple prompts.
    Simple,
    /// Medium prompts.
    Medium,
    /// Long or hard prompts.
    Complex,
    /// Code.
    Code,
}

/// Compute per replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelResources {
    /// GPUs per replica, requested as the extended resource `gpuResourceName`.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub gpu: u32,
    /// Extended resource name of a GPU, e.g. `amd.com/gpu` or a MIG profile
    /// `nvidia.com/mig-1g.10gb`.
    #[serde(default = "default_gpu_resource_name")]
    #[schemars(
        length(min = 1, max = 253),
        regex(
            pattern = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
        )
    )]
    pub gpu_resource_name: String,
    /// Memory, as a Kubernetes quantity.
    #[serde(default = "default_memory")]
    #[schemars(regex(pattern = "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"))]
    pub memory: String,
    /// CPU, as a Kubernetes quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9]+(\\.[0-9]+)?m?$"))]
    pub cpu: Option<String>,
}

impl Default for ModelResources {
    fn default() -> Self {
        Self {
            gpu: 0,
            gpu_resource_name: default_gpu_resource_name(),
            memory: default_memory(),
            cpu: None,
        }
    }
}

fn default_gpu_resource_name() -> String {
    "nvidia.com/gpu".to_owned()
}

fn default_memory() -> String {
    "8Gi".to_owned()
}

/// Persistent storage for model weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Volume size, as a Kubernetes quantity.
    #[schemars(regex(pattern = "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"))]
    pub size: String,
    /// StorageClass; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Access mode of the volume. `ReadWriteOnce` (the default): each replica gets a claim
    /// of its own, created with its pod and deleted with it (a generic ephemeral volume), so
    /// replicas on different nodes never contend for one volume; each new pod pulls the
    /// model. `ReadWriteMany` (a class such as NFS, CephFS or EFS): one claim shared by
    /// every replica, kept while the resource lives.
    #[serde(default)]
    pub access_mode: AccessMode,
}

/// Access mode of the weights volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AccessMode {
    /// Mounted read-write by one node.
    #[default]
    ReadWriteOnce,
    /// Mounted read-write by many nodes.
    ReadWriteMany,
}

impl AccessMode {
    /// The name Kubernetes uses.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadWriteMany => "ReadWriteMany",
        }
    }
}

/// Autoscaling on gateway demand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas").field_path(".minReplicas")
)]
pub struct Autoscaling {
    /// Fewest replicas.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Requests waiting for this model, per replica, above which it scales up.
    #[serde(default = "default_queue_depth")]
    #[schemars(range(min = 1))]
    pub queue_depth: u32,
    /// p95 latency in milliseconds above which it scales up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub latency_ms: Option<u32>,
    /// Seconds after a scale change before scaling down again.
    #[serde(default = "default_cooldown")]
    #[schemars(range(min = 0, max = 86400))]
    pub cooldown_seconds: u32,
}

fn default_min_replicas() -> i32 {
    1
}

fn default_queue_depth() -> u32 {
    100
}

fn default_cooldown() -> u32 {
    300
}

/// Observed state of a local model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalModelDeploymentStatus {
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing and Degraded (see the operator's `local_model` controller).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Replicas running.
    #[serde(default)]
    pub replicas: i32,
    /// Replicas ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Requests waiting for this model at the gateway.
    #[serde(default)]
    pub queue_depth: u64,
    /// Requests the gateway's replicas are sending to this model now.
    #[serde(default)]
    pub in_flight: u64,
    /// The largest p95 answer time (ms) a gateway replica reports for this model over its
    /// last 30 s.
    #[serde(default)]
    pub latency_p95_ms: u64,
    /// Why the autoscaler last changed the replica count (signal and threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// When the autoscaler last changed the replica count (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    /// The Ollama API of this model inside the cluster, e.g.
    /// `http://llama.models.svc:11434`: the `baseUrl` a pool's ollama provider references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}
