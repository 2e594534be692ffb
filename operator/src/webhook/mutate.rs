//! The sidecar a pod that asks for it gets (the annotation or the label
//! `floodgate.dev/inject: "true"`, the label being what the webhook's opt-in objectSelector
//! matches; or, in a namespace labelled `floodgate.dev/inject: enabled`, every pod that does
//! not say `"false"`, see [`Scope`]): a `floodgate-proxy` container listening on the pod's loopback, configured from a
//! ConfigMap (the proxy's config file, as `--config` reads it), and every application
//! container pointed at it through `FLOODGATE_URL`, `OPENAI_BASE_URL` and `ANTHROPIC_BASE_URL`
//! (set only where the container does not set them itself). A pod that already has the
//! sidecar is left as it is, so a re-invocation changes nothing.
//!
//! **Native sidecar.** The proxy is the first init container, with `restartPolicy: Always`
//! (Kubernetes' native sidecars, on by default since 1.29): it starts before the pod's other
//! init containers and its apps, is restarted if it exits, and is stopped after the apps
//! end, so a Job's pod completes when its work does instead of running forever beside a
//! gateway that never exits.
//!
//! **Probes.** The gateway listens on the pod's loopback only, and the kubelet probes the
//! pod's IP: so the sidecar also runs `--probe-listen 0.0.0.0:<port + 1>`, a listener that
//! serves `/healthz` and `/readyz` and nothing else (not the doors, not `/metrics`, not the
//! admin API's dead-letter operations), and gets a readiness probe on `/readyz` (ready once
//! its configuration loaded; a native sidecar's readiness counts in the pod's) and a liveness
//! probe on `/healthz` there. IPv4: a pod whose IP the kubelet probes is IPv6 only would need
//! `[::]`, which fails to bind where IPv6 is disabled.
//!
//! **Provider keys.** The sidecar runs the gateway in standalone mode on the ConfigMap's
//! config, which names its pools' keys by Secret reference; a key it cannot resolve stops it
//! at start-up with an error naming the Secret and key. A pod can mount only Secrets of its
//! own namespace, so the keys must be there, and the pod names them in the annotation
//! `floodgate.dev/secrets` (comma-separated Secret names): each is mounted read-only into the
//! sidecar alone at `/etc/floodgate/secrets/<name>`, and the sidecar reads them with
//! `--secrets-dir` (the apps never see them). A name that cannot name a Secret refuses the
//! pod ([`Refusal::BadSecret`]); a Secret that does not exist keeps the pod from starting, and
//! the kubelet says which (a `FailedMount` Event). Without the annotation the keys can only
//! come from Secret manifests inside the ConfigMap's config.
//!
//! **Port.** The sidecar listens on `--sidecar-port` ([`DEFAULT_PORT`], an uncommon one), or
//! on the pod's annotation `floodgate.dev/port`, and its probes on the next port. A pod whose
//! containers already declare either port is refused ([`Refusal`]), naming the container and
//! the annotation to set: two listeners on one port would leave the app or the sidecar
//! failing to start.

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, HTTPGetAction, Pod, Probe,
    ResourceRequirements, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// The annotation that asks for the sidecar.
pub const INJECT: &str = "floodgate.dev/inject";
/// The annotation naming the ConfigMap of the sidecar's config (key `config.yaml`).
pub const CONFIG: &str = "floodgate.dev/config";
/// The sidecar container's name.
pub const CONTAINER: &str = "floodgate-proxy";
/// The config volume's name.
pub const VOLUME: &str = "floodgate-config";
/// The annotation choosing the sidecar's port for one pod.
pub const PORT: &str = "floodgate.dev/port";
/// The annotation naming the Secrets (comma-separated) that hold the sidecar's provider keys.
pub const SECRETS: &str = "floodgate.dev/secrets";
/// Where the sidecar finds them: `<this>/<secret>/<key>`, its `--secrets-dir`.
pub const SECRETS_DIR: &str = "/etc/floodgate/secrets";
/// The sidecar's port unless configured: not 8080 or another port applications commonly use.
pub const DEFAULT_PORT: u16 = 14080;
/// The name of the sidecar's probe port (the next one after its own).
pub const PROBE_PORT_NAME: &str = "floodgate-probe";

/// Why a pod that asks for the sidecar cannot have it (the review is denied with this text,
/// which the pod's creator sees: `kubectl apply` prints it, a ReplicaSet records it in a
/// `FailedCreate` Event).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A container already declares the sidecar's port.
    #[error(
        "floodgate sidecar not injected: container {container:?} already uses port {port}, the floodgate-proxy \
         sidecar's; set the pod annotation {PORT} to a free port"
    )]
    PortTaken {
        /// The container using it.
        container: String,
        /// The port.
        port: u16,
    },
    /// The port annotation is not a port number (below 65535: the probes take the next).
    #[error(
        "floodgate sidecar not injected: annotation {PORT} is {0:?}, not a port number (1-65534; the sidecar's probes use the next port)"
    )]
    BadPort(String),
    /// The secrets annotation names something that cannot name a Secret.
    #[error(
        "floodgate sidecar not injected: annotation {SECRETS} names {0:?}, which cannot name a Secret \
         (lower-case letters, digits, '-' and '.', at most 253)"
    )]
    BadSecret(String),
}

/// How the sidecar is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// The proxy's image.
    pub image: String,
    /// The loopback port it listens on.
    pub port: u16,
    /// The ConfigMap of its config when the pod does not name one.
    pub default_config_map: String,
}

impl Default for Sidecar {
    fn default() -> Self {
        Self {
            image: "ghcr.io/floodgate-dev/floodgate-proxy:0.1.0".into(),
            port: DEFAULT_PORT,
            default_config_map: "floodgate-sidecar".into(),
        }
    }
}

/// Who asked for the sidecar, as the webhook entry that called tells (its path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The pod itself must ask: label or annotation `floodgate.dev/inject: "true"`.
    Pod,
    /// The pod's namespace opted in (namespace label `floodgate.dev/inject: enabled`): every
    /// pod gets the sidecar unless it says `floodgate.dev/inject: "false"`.
    Namespace,
}

/// `pod` with the sidecar when it asks for it (see [`Scope`]), `Ok(None)` when it does not or
/// already has it, or why it cannot have it.
pub fn inject(pod: &Pod, sidecar: &Sidecar, scope: Scope) -> Result<Option<Pod>, Refusal> {
    let annotations = pod.metadata.annotations.as_ref();
    let labels = pod.metadata.labels.as_ref();
    let says = |value: &str| {
        [annotations, labels]
            .iter()
            .any(|m| m.and_then(|m| m.get(INJECT)).map(String::as_str) == Some(value))
    };
    let asked = match scope {
        Scope::Pod => says("true"),
        Scope::Namespace => !says("false"),
    };
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(None);
    };
    let has_sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == CONTAINER);
    if !asked || has_sidecar {
        return Ok(None);
    }
    let port = match annotations.and_then(|a| a.get(PORT)) {
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port > 0 && port < u16::MAX => port,
            _ => return Err(Refusal::BadPort(text.clone())),
        },
        None => sidecar.port,
    };
    let ours = [i32::from(port), i32::from(port) + 1];
    let declared = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten().map(move |p| (c, p)))
        .find(|(_, p)| ours.contains(&p.container_port));
    if let Some((c, p)) = declared {
        return Err(Refusal::PortTaken {
            container: c.name.clone(),
            port: u16::try_from(p.container_port).unwrap_or(port),
        });
    }
    let secrets = secret_names(annotations.and_then(|a| a.get(SECRETS)))?;
    let sidecar = &Sidecar {
        port,
        ..sidecar.clone()
    };
    let config_map = annotations
        .and_then(|a| a.get(CONFIG))
        .cloned()
        .unwrap_or_else(|| sidecar.default_config_map.clone());
    let url = format!("http://127.0.0.1:{}", sidecar.port);
    let mut pod = pod.clone();
    let spec = pod.spec.get_or_insert_with(Default::default);
    for c in &mut spec.containers {
        let env = c.env.get_or_insert_with(Vec::new);
        for (name, value) in [
            ("FLOODGATE_URL", url.clone()),
            ("OPENAI_BASE_URL", format!("{url}/v1")),
            ("ANTHROPIC_BASE_URL", url.clone()),
        ] {
            if !env.iter().any(|e| e.name == name) {
                env.push(EnvVar {
                    name: name.into(),
                    value: Some(value),
                    value_from: None,
                });
            }
        }
    }
    let mut proxy = container(sidecar);
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map,
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    });
    for (i, secret) in secrets.iter().enumerate() {
        let name = format!("{VOLUME}-secret-{i}");
        volumes.push(Volume {
            name: name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        proxy
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name,
                mount_path: format!("{SECRETS_DIR}/{secret}"),
                read_only: Some(true),
                ..VolumeMount::default()
            });
    }
    if !secrets.is_empty() {
        let args = proxy.args.get_or_insert_with(Vec::new);
        args.extend(["--secrets-dir".to_owned(), SECRETS_DIR.to_owned()]);
    }
    spec.init_containers
        .get_or_insert_with(Vec::new)
        .insert(0, proxy);
    Ok(Some(pod))
}

/// The Secret names of the secrets annotation, in order, once each; a name that is not a
/// DNS subdomain (what a Secret's name must be) refuses the pod.
fn secret_names(annotation: Option<&String>) -> Result<Vec<String>, Refusal> {
    let mut names: Vec<String> = Vec::new();
    for name in annotation
        .into_iter()
        .flat_map(|a| a.split(','))
        .map(str::trim)
    {
        if name.is_empty() || names.iter().any(|n| n == name) {
            continue;
        }
        let valid = name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            });
        if !valid {
            return Err(Refusal::BadSecret(name.to_owned()));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

fn container(sidecar: &Sidecar) -> Container {
    let quantity = |s: &str| Quantity(s.into());
    let probe_port = i32::from(sidecar.port) + 1;
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(PROBE_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    Container {
        name: CONTAINER.into(),
        image: Some(sidecar.image.clone()),
        args: Some(vec![
            "--config".into(),
            "/etc/floodgate/config.yaml".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", sidecar.port),
            "--probe-listen".into(),
            format!("0.0.0.0:{probe_port}"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("floodgate".into()),
                container_port: i32::from(sidecar.port),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(PROBE_PORT_NAME.into()),
                container_port: probe_port,
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME.into(),
            mount_path: "/etc/floodgate".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), quantity("50m")),
                ("memory".into(), quantity("64Mi")),
            ])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            ..SecurityContext::default()
        }),
        // A native sidecar: runs beside the apps, and does not keep a Job's pod alive.
        restart_policy: Some("Always".into()),
        ..Container::default()
    }
}

#[cfg(test)]
mod tests;
