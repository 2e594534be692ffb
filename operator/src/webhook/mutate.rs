//! The sidecar a pod annotated `floodgate.dev/inject: "true"` gets: a `floodgate-proxy`
//! container listening on the pod's loopback, configured from a ConfigMap (the proxy's config
//! file, as `--config` reads it), and every application container pointed at it through
//! `FLOODGATE_URL`, `OPENAI_BASE_URL` and `ANTHROPIC_BASE_URL` (set only where the container
//! does not set them itself). A pod that already has the sidecar is left as it is, so a
//! re-invocation changes nothing.

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, Pod, ResourceRequirements,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

/// The annotation that asks for the sidecar.
pub const INJECT: &str = "floodgate.dev/inject";
/// The annotation naming the ConfigMap of the sidecar's config (key `config.yaml`).
pub const CONFIG: &str = "floodgate.dev/config";
/// The sidecar container's name.
pub const CONTAINER: &str = "floodgate-proxy";
/// The config volume's name.
pub const VOLUME: &str = "floodgate-config";

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
            port: 8080,
            default_config_map: "floodgate-sidecar".into(),
        }
    }
}

/// `pod` with the sidecar, or `None` when it asks for none or already has it.
pub fn inject(pod: &Pod, sidecar: &Sidecar) -> Option<Pod> {
    let annotations = pod.metadata.annotations.as_ref();
    let asked = annotations.and_then(|a| a.get(INJECT)).map(String::as_str) == Some("true");
    let spec = pod.spec.as_ref()?;
    if !asked || spec.containers.iter().any(|c| c.name == CONTAINER) {
        return None;
    }
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
    spec.containers.push(container(sidecar));
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map,
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    });
    Some(pod)
}

fn container(sidecar: &Sidecar) -> Container {
    let quantity = |s: &str| Quantity(s.into());
    Container {
        name: CONTAINER.into(),
        image: Some(sidecar.image.clone()),
        args: Some(vec![
            "--config".into(),
            "/etc/floodgate/config.yaml".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", sidecar.port),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("floodgate".into()),
            container_port: i32::from(sidecar.port),
            ..ContainerPort::default()
        }]),
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
        ..Container::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "app", "annotations": annotations},
            "spec": {"containers": [
                {"name": "app", "image": "app:1", "env": [{"name": "OPENAI_BASE_URL", "value": "http://mine"}]},
                {"name": "worker", "image": "app:1"}
            ]}
        }))
        .unwrap()
    }

    fn env(c: &Container, name: &str) -> Option<String> {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)?
            .value
            .clone()
    }

    #[test]
    fn an_annotated_pod_gets_the_sidecar_and_its_apps_point_at_it() {
        let out = inject(
            &pod(serde_json::json!({INJECT: "true", CONFIG: "team-proxy"})),
            &Sidecar::default(),
        )
        .unwrap();
        let spec = out.spec.unwrap();
        assert_eq!(spec.containers.len(), 3);
        let sidecar = &spec.containers[2];
        assert_eq!(sidecar.name, CONTAINER);
        assert_eq!(
            sidecar.args.as_deref().unwrap()[2..],
            ["--listen".to_owned(), "127.0.0.1:8080".to_owned()]
        );
        let volume = &spec.volumes.unwrap()[0];
        assert_eq!(volume.config_map.as_ref().unwrap().name, "team-proxy");
        // The app's own setting wins; what it lacks points at the sidecar.
        assert_eq!(
            env(&spec.containers[0], "OPENAI_BASE_URL").unwrap(),
            "http://mine"
        );
        assert_eq!(
            env(&spec.containers[0], "FLOODGATE_URL").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            env(&spec.containers[1], "OPENAI_BASE_URL").unwrap(),
            "http://127.0.0.1:8080/v1"
        );
        assert_eq!(env(sidecar, "FLOODGATE_URL"), None);
    }

    #[test]
    fn other_pods_and_injected_pods_are_left_alone() {
        let sidecar = Sidecar::default();
        assert!(inject(&pod(serde_json::json!({})), &sidecar).is_none());
        assert!(inject(&pod(serde_json::json!({INJECT: "false"})), &sidecar).is_none());
        let once = inject(&pod(serde_json::json!({INJECT: "true"})), &sidecar).unwrap();
        assert_eq!(
            once.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0]
                .config_map
                .as_ref()
                .unwrap()
                .name,
            "floodgate-sidecar"
        );
        assert!(inject(&once, &sidecar).is_none());
    }
}
