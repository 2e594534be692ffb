use super::*;
use k8s_openapi::api::core::v1::PodSpec;

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

/// The spec of `pod(annotations)` once the default sidecar is injected.
fn injected(annotations: serde_json::Value) -> PodSpec {
    inject(&pod(annotations), &Sidecar::default(), Scope::Pod)
        .unwrap()
        .unwrap()
        .spec
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
        Scope::Pod,
    )
    .unwrap()
    .unwrap();
    let spec = out.spec.unwrap();
    // A native sidecar: the first init container, restarted always; the apps are unchanged in
    // number.
    assert_eq!(spec.containers.len(), 2);
    let inits = spec.init_containers.as_ref().unwrap();
    assert_eq!(inits.len(), 1);
    let sidecar = &inits[0];
    assert_eq!(sidecar.name, CONTAINER);
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        sidecar.args.as_deref().unwrap()[2..],
        [
            "--listen".to_owned(),
            "127.0.0.1:14080".to_owned(),
            "--probe-listen".to_owned(),
            "0.0.0.0:14081".to_owned()
        ]
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
        "http://127.0.0.1:14080"
    );
    assert_eq!(
        env(&spec.containers[1], "OPENAI_BASE_URL").unwrap(),
        "http://127.0.0.1:14080/v1"
    );
    assert_eq!(env(sidecar, "FLOODGATE_URL"), None);
}

#[test]
fn other_pods_and_injected_pods_are_left_alone() {
    let sidecar = Sidecar::default();
    assert_eq!(
        inject(&pod(serde_json::json!({})), &sidecar, Scope::Pod),
        Ok(None)
    );
    assert_eq!(
        inject(
            &pod(serde_json::json!({INJECT: "false"})),
            &sidecar,
            Scope::Pod
        ),
        Ok(None)
    );
    let once = inject(
        &pod(serde_json::json!({INJECT: "true"})),
        &sidecar,
        Scope::Pod,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        once.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0]
            .config_map
            .as_ref()
            .unwrap()
            .name,
        "floodgate-sidecar"
    );
    assert_eq!(inject(&once, &sidecar, Scope::Pod), Ok(None));
}

fn sidecar_listen(pod: &Pod) -> String {
    let spec = pod.spec.as_ref().unwrap();
    let c = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER)
        .unwrap();
    c.args.as_ref().unwrap()[3].clone()
}

#[test]
fn the_default_port_is_not_8080_and_a_pod_using_the_sidecars_port_is_refused() {
    let sidecar = Sidecar::default();
    assert_ne!(sidecar.port, 8080);
    let mut app = pod(serde_json::json!({INJECT: "true"}));
    // An app on 8080 (common) is fine now.
    app.spec.as_mut().unwrap().containers[0].ports = Some(vec![ContainerPort {
        container_port: 8080,
        ..ContainerPort::default()
    }]);
    let out = inject(&app, &sidecar, Scope::Pod).unwrap().unwrap();
    assert_eq!(sidecar_listen(&out), format!("127.0.0.1:{DEFAULT_PORT}"));

    // A worker on the sidecar's port: refused, naming it and the way out.
    app.spec.as_mut().unwrap().containers[1].ports = Some(vec![ContainerPort {
        container_port: i32::from(DEFAULT_PORT),
        ..ContainerPort::default()
    }]);
    let refused = inject(&app, &sidecar, Scope::Pod).unwrap_err();
    assert_eq!(
        refused,
        Refusal::PortTaken {
            container: "worker".into(),
            port: DEFAULT_PORT
        }
    );
    assert!(refused.to_string().contains(PORT), "{refused}");

    // The annotation moves the sidecar, and the apps' URLs with it.
    app.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(PORT.into(), "15999".into());
    let out = inject(&app, &sidecar, Scope::Pod).unwrap().unwrap();
    assert_eq!(sidecar_listen(&out), "127.0.0.1:15999");
    let first = &out.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        env(first, "FLOODGATE_URL").unwrap(),
        "http://127.0.0.1:15999"
    );

    // A port taken where the probes would listen, the next one: refused too.
    app.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(PORT.into(), "8079".into());
    app.spec.as_mut().unwrap().containers[1].ports = None;
    assert_eq!(
        inject(&app, &sidecar, Scope::Pod),
        Err(Refusal::PortTaken {
            container: "app".into(),
            port: 8080
        })
    );

    for bad in ["0", "http", "70000", "65535"] {
        app.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(PORT.into(), bad.into());
        assert_eq!(
            inject(&app, &sidecar, Scope::Pod),
            Err(Refusal::BadPort(bad.into()))
        );
    }
}

#[test]
fn the_opt_in_label_asks_for_the_sidecar_like_the_annotation() {
    let mut labelled = pod(serde_json::json!({}));
    labelled.metadata.labels = Some([(INJECT.to_owned(), "true".to_owned())].into());
    assert!(
        inject(&labelled, &Sidecar::default(), Scope::Pod)
            .unwrap()
            .is_some()
    );
}

#[test]
fn in_an_opted_in_namespace_every_pod_gets_it_unless_it_says_false() {
    let sidecar = Sidecar::default();
    let plain = pod(serde_json::json!({}));
    assert_eq!(inject(&plain, &sidecar, Scope::Pod), Ok(None));
    assert!(
        inject(&plain, &sidecar, Scope::Namespace)
            .unwrap()
            .is_some()
    );
    let refusing = pod(serde_json::json!({INJECT: "false"}));
    assert_eq!(inject(&refusing, &sidecar, Scope::Namespace), Ok(None));
}

#[test]
fn the_sidecar_starts_before_the_pods_own_init_containers() {
    let mut app = pod(serde_json::json!({INJECT: "true"}));
    app.spec.as_mut().unwrap().init_containers = Some(vec![Container {
        name: "migrate".into(),
        image: Some("app:1".into()),
        ..Container::default()
    }]);
    let out = inject(&app, &Sidecar::default(), Scope::Pod)
        .unwrap()
        .unwrap();
    let names: Vec<String> = out
        .spec
        .unwrap()
        .init_containers
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, [CONTAINER, "migrate"]);
}

/// The kubelet probes the pod's IP, where only the probe listener is: the probes name its
/// port, and that port is the one `--probe-listen` binds on every address.
#[test]
fn the_sidecar_is_probed_on_its_probe_only_listener() {
    let spec = injected(serde_json::json!({INJECT: "true", PORT: "15999"}));
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    let args = sidecar.args.as_deref().unwrap();
    let at = args.iter().position(|a| a == "--probe-listen").unwrap();
    assert_eq!(args[at + 1], "0.0.0.0:16000");
    let port = sidecar
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(PROBE_PORT_NAME))
        .unwrap();
    assert_eq!(port.container_port, 16000);
    for (probe, path) in [
        (&sidecar.readiness_probe, "/readyz"),
        (&sidecar.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String(PROBE_PORT_NAME.into()));
    }
}

/// The pool's keys: the Secrets the pod names are mounted into the sidecar alone, where its
/// `--secrets-dir` reads `<secret>/<key>`; a name no Secret could have refuses the pod.
#[test]
fn the_secrets_a_pod_names_reach_the_sidecar_only() {
    let spec =
        injected(serde_json::json!({INJECT: "true", SECRETS: "claude-keys, gpt.keys,claude-keys"}));
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    let args = sidecar.args.as_deref().unwrap();
    assert_eq!(args[args.len() - 2..], ["--secrets-dir", SECRETS_DIR]);
    let mounts: Vec<(String, String, Option<bool>)> = sidecar
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.clone(), m.mount_path.clone(), m.read_only))
        .collect();
    assert_eq!(
        mounts[1..],
        [
            (
                "floodgate-config-secret-0".to_owned(),
                "/etc/floodgate/secrets/claude-keys".to_owned(),
                Some(true)
            ),
            (
                "floodgate-config-secret-1".to_owned(),
                "/etc/floodgate/secrets/gpt.keys".to_owned(),
                Some(true)
            )
        ]
    );
    let secrets: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.secret.as_ref()?.secret_name.as_deref()?)))
        .collect();
    assert_eq!(
        secrets,
        [
            ("floodgate-config-secret-0", "claude-keys"),
            ("floodgate-config-secret-1", "gpt.keys")
        ]
    );
    assert!(
        spec.containers.iter().all(|c| c.volume_mounts.is_none()),
        "the apps do not see the keys"
    );

    // Without the annotation: no Secret, no --secrets-dir.
    let plain = injected(serde_json::json!({INJECT: "true"}));
    let sidecar = &plain.init_containers.as_ref().unwrap()[0];
    assert!(
        !sidecar
            .args
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a == "--secrets-dir")
    );

    for bad in ["Claude_Keys", "-keys", "a..b", "../etc"] {
        let refused = inject(
            &pod(serde_json::json!({INJECT: "true", SECRETS: bad})),
            &Sidecar::default(),
            Scope::Pod,
        );
        assert_eq!(refused, Err(Refusal::BadSecret(bad.into())), "{bad}");
    }
}
