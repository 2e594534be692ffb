//! The objects a LocalModelDeployment owns, built from its spec without I/O: a Deployment
//! running Ollama (the model pulled by an init container before the server starts), a
//! ClusterIP Service in front of it, and the weights' storage.
//!
//! **Weights storage.** A volume mounted `ReadWriteOnce` can be attached to one node only,
//! and 2-20 GPU replicas land on as many nodes: one claim shared by all of them would leave
//! every replica but the first node's stuck in `ContainerCreating`. So with the default
//! `ReadWriteOnce` each replica gets a claim of its own, as a generic ephemeral volume of the
//! pod (the controller manager creates `<pod>-models` with the pod, owned by it, and deletes
//! it with it): any storage class works, replicas roll and scale freely, and nothing piles up
//! when the autoscaler scales down. The cost is a pull of the model by every new pod, as on
//! a new node anyway. A StatefulSet's volumeClaimTemplates would keep each replica's weights
//! across pod replacement, but would replace the Deployment (and the rollout conditions the
//! status reads from it) and keep a claim for every replica ever scaled to. Only with
//! `accessMode: ReadWriteMany` (NFS, CephFS, EFS, Filestore...) is there one claim,
//! `<name>-models`, owned by the resource and shared by every replica.

use floodgate_crds::local_model::{AccessMode, LocalModelDeployment, LocalModelDeploymentSpec};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EphemeralVolumeSource, HTTPGetAction,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimTemplate,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    Service, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// Port of the Ollama API.
pub const OLLAMA_PORT: i32 = 11434;
/// Label naming the LocalModelDeployment a pod serves; the pods' selector.
pub const MODEL_LABEL: &str = "floodgate.dev/local-model";
/// `app.kubernetes.io/managed-by` of every owned object; the operator watches only these.
pub const MANAGED_BY: &str = "floodgate-operator";
/// Where Ollama keeps its models inside the containers.
const MODELS_DIR: &str = "/root/.ollama";
/// The init container's script: start a private server, pull the model, stop the server.
/// The model comes in through the environment, never spliced into the script.
const PULL_SCRIPT: &str = r#"set -eu
ollama serve >/tmp/ollama-serve.log 2>&1 &
server=$!
tries=0
until ollama list >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 120 ]; then echo "ollama serve did not start:" >&2; cat /tmp/ollama-serve.log >&2; exit 1; fi
  sleep 1
done
ollama pull "$FLOODGATE_MODEL"
kill "$server"
wait "$server" || true
"#;

/// The labels of every owned object.
pub fn labels(lmd: &LocalModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "ollama".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), lmd.name_any()),
        (
            "app.kubernetes.io/component".to_owned(),
            "local-model".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
        (MODEL_LABEL.to_owned(), lmd.name_any()),
    ])
}

/// The pods' selector; also the `status.selector` of the scale subresource.
pub fn selector(lmd: &LocalModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([(MODEL_LABEL.to_owned(), lmd.name_any())])
}

/// `selector` as a label selector string, e.g. `floodgate.dev/local-model=llama`.
pub fn selector_string(lmd: &LocalModelDeployment) -> String {
    format!("{MODEL_LABEL}={}", lmd.name_any())
}

/// Name of the shared weights claim (`accessMode: ReadWriteMany`). A replica's own claim
/// is named by the controller manager after its pod and the volume: `<pod>-models`.
pub fn pvc_name(lmd: &LocalModelDeployment) -> String {
    format!("{}-models", lmd.name_any())
}

/// Whether every replica gets a weights claim of its own (storage asked, `ReadWriteOnce`).
pub fn claim_per_replica(spec: &LocalModelDeploymentSpec) -> bool {
    spec.storage
        .as_ref()
        .is_some_and(|s| s.access_mode == AccessMode::ReadWriteOnce)
}

/// The in-cluster URL of the Ollama API: the `baseUrl` for a pool's ollama provider.
pub fn endpoint(lmd: &LocalModelDeployment) -> String {
    format!(
        "http://{}.{}.svc:{OLLAMA_PORT}",
        lmd.name_any(),
        lmd.namespace().unwrap_or_default()
    )
}

/// Replicas the Deployment should run: `spec.replicas` (the scale subresource writes it), else
/// the autoscaling minimum, else one.
pub fn desired_replicas(spec: &LocalModelDeploymentSpec) -> i32 {
    spec.replicas
        .or_else(|| spec.autoscaling.as_ref().map(|a| a.min_replicas))
        .unwrap_or(1)
}

/// Why the resource's name cannot name a Service (which needs a DNS-1035 label), if so.
pub fn invalid_name(lmd: &LocalModelDeployment) -> Option<String> {
    let name = lmd.name_any();
    let ok = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    (!ok).then(|| {
        format!("name {name:?} cannot name a Service: use at most 63 lower-case letters, digits and '-', starting with a letter")
    })
}

fn meta(lmd: &LocalModelDeployment, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: lmd.namespace(),
        labels: Some(labels(lmd)),
        owner_references: lmd.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// The shared weights claim, when the spec asks for `ReadWriteMany` storage (with
/// `ReadWriteOnce` each pod's claim comes from its [`claim_template`]).
pub fn pvc(lmd: &LocalModelDeployment) -> Option<PersistentVolumeClaim> {
    if claim_per_replica(&lmd.spec) {
        return None;
    }
    Some(PersistentVolumeClaim {
        metadata: meta(lmd, pvc_name(lmd)),
        spec: Some(claim_spec(&lmd.spec)?),
        ..PersistentVolumeClaim::default()
    })
}

/// What a weights claim asks for, when the spec asks for storage.
fn claim_spec(spec: &LocalModelDeploymentSpec) -> Option<PersistentVolumeClaimSpec> {
    let storage = spec.storage.as_ref()?;
    Some(PersistentVolumeClaimSpec {
        access_modes: Some(vec![storage.access_mode.as_str().to_owned()]),
        storage_class_name: storage.storage_class_name.clone(),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity(storage.size.clone()),
            )])),
            ..VolumeResourceRequirements::default()
        }),
        ..PersistentVolumeClaimSpec::default()
    })
}

/// The claim each pod gets (a generic ephemeral volume), labelled as every owned object so
/// that the operator finds a replica's pending claim by the model's selector.
pub fn claim_template(lmd: &LocalModelDeployment) -> Option<PersistentVolumeClaimTemplate> {
    if !claim_per_replica(&lmd.spec) {
        return None;
    }
    Some(PersistentVolumeClaimTemplate {
        metadata: Some(ObjectMeta {
            labels: Some(labels(lmd)),
            ..ObjectMeta::default()
        }),
        spec: claim_spec(&lmd.spec)?,
    })
}

/// The Service in front of the pods.
pub fn service(lmd: &LocalModelDeployment) -> Service {
    Service {
        metadata: meta(lmd, lmd.name_any()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector(lmd)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: OLLAMA_PORT,
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The Deployment running Ollama.
pub fn deployment(lmd: &LocalModelDeployment) -> Deployment {
    let spec = &lmd.spec;
    Deployment {
        metadata: meta(lmd, lmd.name_any()),
        spec: Some(DeploymentSpec {
            replicas: Some(desired_replicas(spec)),
            revision_history_limit: Some(3),
            selector: LabelSelector {
                match_labels: Some(selector(lmd)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(lmd)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(lmd)),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn pod_spec(lmd: &LocalModelDeployment) -> PodSpec {
    let spec = &lmd.spec;
    let volume = match (&spec.storage, claim_template(lmd)) {
        (_, Some(template)) => Volume {
            name: "models".to_owned(),
            ephemeral: Some(EphemeralVolumeSource {
                volume_claim_template: Some(template),
            }),
            ..Volume::default()
        },
        (Some(_), None) => Volume {
            name: "models".to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc_name(lmd),
                read_only: None,
            }),
            ..Volume::default()
        },
        (None, None) => Volume {
            name: "models".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    };
    let mounts = vec![VolumeMount {
        name: "models".to_owned(),
        mount_path: MODELS_DIR.to_owned(),
        ..VolumeMount::default()
    }];
    let pull = Container {
        name: "pull-model".to_owned(),
        image: Some(spec.image.clone()),
        command: Some(vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            PULL_SCRIPT.to_owned(),
        ]),
        env: Some(vec![
            env("OLLAMA_HOST", "127.0.0.1:11434"),
            env("FLOODGATE_MODEL", &spec.model),
        ]),
        volume_mounts: Some(mounts.clone()),
        resources: Some(resources(spec, false)),
        ..Container::default()
    };
    let http_get = |path: &str| HTTPGetAction {
        path: Some(path.to_owned()),
        port: IntOrString::String("http".to_owned()),
        ..HTTPGetAction::default()
    };
    let ollama = Container {
        name: "ollama".to_owned(),
        image: Some(spec.image.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: OLLAMA_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env: Some(ollama_env(spec)),
        resources: Some(resources(spec, true)),
        volume_mounts: Some(mounts),
        // The init container pulled the model: the server answering its API means ready.
        readiness_probe: Some(Probe {
            http_get: Some(http_get("/api/tags")),
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(http_get("/")),
            initial_delay_seconds: Some(30),
            period_seconds: Some(20),
            failure_threshold: Some(6),
            ..Probe::default()
        }),
        ..Container::default()
    };
    PodSpec {
        init_containers: Some(vec![pull]),
        containers: vec![ollama],
        volumes: Some(vec![volume]),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: Some(tolerations(spec)).filter(|t| !t.is_empty()),
        affinity: spec.affinity.clone(),
        ..PodSpec::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

/// The server's environment: its address and the spec's Ollama settings.
pub fn ollama_env(spec: &LocalModelDeploymentSpec) -> Vec<EnvVar> {
    let mut vars = vec![env("OLLAMA_HOST", &format!("0.0.0.0:{OLLAMA_PORT}"))];
    if let Some(n) = spec.ollama.num_parallel {
        vars.push(env("OLLAMA_NUM_PARALLEL", &n.to_string()));
    }
    if let Some(keep_alive) = &spec.ollama.keep_alive {
        vars.push(env("OLLAMA_KEEP_ALIVE", keep_alive));
    }
    vars
}

/// Requests and limits of a container: memory and CPU as asked, and the GPUs (extended
/// resources go in limits, and requests must then equal them) only on the server.
pub fn resources(spec: &LocalModelDeploymentSpec, with_gpu: bool) -> ResourceRequirements {
    let r = &spec.resources;
    let mut requests = BTreeMap::from([("memory".to_owned(), Quantity(r.memory.clone()))]);
    let mut limits = BTreeMap::from([("memory".to_owned(), Quantity(r.memory.clone()))]);
    if let Some(cpu) = &r.cpu {
        requests.insert("cpu".to_owned(), Quantity(cpu.clone()));
    }
    if with_gpu && r.gpu > 0 {
        let gpus = Quantity(r.gpu.to_string());
        requests.insert(r.gpu_resource_name.clone(), gpus.clone());
        limits.insert(r.gpu_resource_name.clone(), gpus);
    }
    ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..ResourceRequirements::default()
    }
}

/// The spec's tolerations, plus one for a taint keyed by the GPU resource name when GPUs are
/// requested and none for that key is listed (the usual taint of GPU nodes).
pub fn tolerations(spec: &LocalModelDeploymentSpec) -> Vec<Toleration> {
    let mut tolerations = spec.tolerations.clone();
    let key = &spec.resources.gpu_resource_name;
    if spec.resources.gpu > 0 && !tolerations.iter().any(|t| t.key.as_ref() == Some(key)) {
        tolerations.push(Toleration {
            key: Some(key.clone()),
            operator: Some("Exists".to_owned()),
            effect: Some("NoSchedule".to_owned()),
            ..Toleration::default()
        });
    }
    tolerations
}

#[cfg(test)]
mod tests;
