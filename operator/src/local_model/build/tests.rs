use super::*;
use floodgate_crds::LocalModelDeployment;

/// A LocalModelDeployment `llama` in `models` with the given spec fields (JSON), and a uid so
/// that it can own things.
fn lmd(spec: serde_json::Value) -> LocalModelDeployment {
    let mut full = serde_json::json!({"model": "llama3.1:8b", "classes": ["simple"]});
    if let (Some(full), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
        full.extend(extra.clone());
    }
    let mut lmd = LocalModelDeployment::new("llama", serde_json::from_value(full).unwrap());
    lmd.metadata.namespace = Some("models".into());
    lmd.metadata.uid = Some("uid-1".into());
    lmd
}

fn pod(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn container<'a>(d: &'a Deployment, name: &str) -> &'a Container {
    let p = pod(d);
    p.containers
        .iter()
        .chain(p.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap()
}

fn env_of(c: &Container) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

#[test]
fn gpus_are_requested_and_limited_by_the_configured_resource_name() {
    let d = deployment(&lmd(
        serde_json::json!({"resources": {"gpu": 2, "memory": "16Gi", "cpu": "4"}}),
    ));
    let r = container(&d, "ollama").resources.clone().unwrap();
    let gpus = Some(&Quantity("2".into()));
    assert_eq!(r.limits.as_ref().unwrap().get("nvidia.com/gpu"), gpus);
    assert_eq!(r.requests.as_ref().unwrap().get("nvidia.com/gpu"), gpus);
    assert_eq!(
        r.requests.as_ref().unwrap().get("memory"),
        Some(&Quantity("16Gi".into()))
    );
    assert_eq!(
        r.requests.as_ref().unwrap().get("cpu"),
        Some(&Quantity("4".into()))
    );
    // The init container pulls on CPU: it holds no GPU.
    let init = container(&d, "pull-model").resources.clone().unwrap();
    assert!(!init.limits.unwrap().contains_key("nvidia.com/gpu"));

    let amd = deployment(&lmd(
        serde_json::json!({"resources": {"gpu": 1, "gpuResourceName": "amd.com/gpu"}}),
    ));
    let limits = container(&amd, "ollama")
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(limits.get("amd.com/gpu"), Some(&Quantity("1".into())));
    assert!(!limits.contains_key("nvidia.com/gpu"));

    let cpu_only = deployment(&lmd(serde_json::json!({})));
    let limits = container(&cpu_only, "ollama")
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(limits.keys().collect::<Vec<_>>(), ["memory"]);
}

#[test]
fn gpu_pods_tolerate_the_gpu_taint_unless_the_spec_says_otherwise() {
    let d = deployment(&lmd(
        serde_json::json!({"resources": {"gpu": 1}, "nodeSelector": {"gpu": "a100"}}),
    ));
    let p = pod(&d);
    let t = p.tolerations.as_ref().unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].key.as_deref(), Some("nvidia.com/gpu"));
    assert_eq!(t[0].operator.as_deref(), Some("Exists"));
    assert_eq!(
        p.node_selector
            .as_ref()
            .unwrap()
            .get("gpu")
            .map(String::as_str),
        Some("a100")
    );

    let own = lmd(serde_json::json!({"resources": {"gpu": 1},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoExecute"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}));
    let d = deployment(&own);
    let t = pod(&d).tolerations.as_ref().unwrap();
    assert_eq!((t.len(), t[0].effect.as_deref()), (1, Some("NoExecute")));
    assert_eq!(pod(&d).affinity, own.spec.affinity);

    assert_eq!(
        pod(&deployment(&lmd(serde_json::json!({})))).tolerations,
        None
    );
}

#[test]
fn the_model_is_pulled_by_an_init_container_and_readiness_asks_the_ollama_api() {
    let d = deployment(&lmd(
        serde_json::json!({"ollama": {"numParallel": 4, "keepAlive": "24h"}}),
    ));
    let init = container(&d, "pull-model");
    assert_eq!(
        env_of(init).get("FLOODGATE_MODEL").map(String::as_str),
        Some("llama3.1:8b")
    );
    let script = init.command.as_ref().unwrap().join(" ");
    assert!(
        script.contains(r#"ollama pull "$FLOODGATE_MODEL""#),
        "{script}"
    );
    assert!(
        !script.contains("llama3.1"),
        "the model is passed by environment, not spliced in"
    );

    let server = container(&d, "ollama");
    let env = env_of(server);
    assert_eq!(
        env.get("OLLAMA_NUM_PARALLEL").map(String::as_str),
        Some("4")
    );
    assert_eq!(
        env.get("OLLAMA_KEEP_ALIVE").map(String::as_str),
        Some("24h")
    );
    assert_eq!(
        env.get("OLLAMA_HOST").map(String::as_str),
        Some("0.0.0.0:11434")
    );
    let probe = server
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/api/tags"));
    assert_eq!(probe.port, IntOrString::String("http".into()));
    assert_eq!(
        server.ports.as_ref().unwrap()[0].container_port,
        OLLAMA_PORT
    );
    assert_eq!(server.image.as_deref(), Some("ollama/ollama:0.12.6"));

    let plain = deployment(&lmd(serde_json::json!({})));
    assert!(!env_of(container(&plain, "ollama")).contains_key("OLLAMA_NUM_PARALLEL"));
}

#[test]
fn each_replica_gets_its_own_claim_unless_the_volume_is_read_write_many() {
    // ReadWriteOnce (the default): no shared claim; each pod's own, from its template.
    let with_storage =
        lmd(serde_json::json!({"storage": {"size": "50Gi", "storageClassName": "fast"}}));
    assert!(pvc(&with_storage).is_none());
    let d = deployment(&with_storage);
    let volume = &pod(&d).volumes.as_ref().unwrap()[0];
    let template = volume
        .ephemeral
        .as_ref()
        .unwrap()
        .volume_claim_template
        .clone()
        .unwrap();
    let spec = template.spec;
    assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_owned()]));
    assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        spec.resources.unwrap().requests.unwrap().get("storage"),
        Some(&Quantity("50Gi".into()))
    );
    assert_eq!(
        template.metadata.unwrap().labels.unwrap().get(MODEL_LABEL),
        Some(&"llama".to_owned())
    );
    // Pods do not share a volume: they roll like any Deployment's.
    assert_eq!(d.spec.as_ref().unwrap().strategy, None);

    // ReadWriteMany: one claim, owned by the resource, mounted by every replica.
    let shared =
        lmd(serde_json::json!({"storage": {"size": "50Gi", "accessMode": "ReadWriteMany"}}));
    let claim = pvc(&shared).unwrap();
    assert_eq!(claim.metadata.name.as_deref(), Some("llama-models"));
    assert_eq!(
        claim.spec.unwrap().access_modes,
        Some(vec!["ReadWriteMany".to_owned()])
    );
    let d = deployment(&shared);
    let volume = &pod(&d).volumes.as_ref().unwrap()[0];
    assert_eq!(
        volume.persistent_volume_claim.as_ref().unwrap().claim_name,
        "llama-models"
    );
    assert_eq!(volume.ephemeral, None);

    let none = lmd(serde_json::json!({}));
    assert!(pvc(&none).is_none());
    assert!(
        pod(&deployment(&none)).volumes.as_ref().unwrap()[0]
            .empty_dir
            .is_some()
    );
}

#[test]
fn every_object_is_owned_labelled_and_selected_by_the_model_label() {
    let l = lmd(serde_json::json!({"storage": {"size": "1Gi", "accessMode": "ReadWriteMany"}}));
    let d = deployment(&l);
    let s = service(&l);
    let c = pvc(&l).unwrap();
    for m in [&d.metadata, &s.metadata, &c.metadata] {
        let owner = &m.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("LocalModelDeployment", "llama", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(m.namespace.as_deref(), Some("models"));
        assert_eq!(
            m.labels
                .as_ref()
                .unwrap()
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str),
            Some(MANAGED_BY)
        );
    }
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.selector.match_labels.as_ref(), Some(&selector(&l)));
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert!(
        selector(&l)
            .iter()
            .all(|(k, v)| template_labels.get(k) == Some(v))
    );
    assert_eq!(
        s.spec.as_ref().unwrap().selector.as_ref(),
        Some(&selector(&l))
    );
    assert_eq!(endpoint(&l), "http://llama.models.svc:11434");
    assert_eq!(selector_string(&l), "floodgate.dev/local-model=llama");
}

#[test]
fn replicas_come_from_the_spec_else_the_autoscaling_minimum_else_one() {
    let r = |spec| desired_replicas(&lmd(spec).spec);
    assert_eq!(r(serde_json::json!({})), 1);
    assert_eq!(
        r(serde_json::json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 5}})),
        2
    );
    assert_eq!(
        r(serde_json::json!({"replicas": 3, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}})),
        3
    );
    assert_eq!(
        deployment(&lmd(serde_json::json!({"replicas": 0})))
            .spec
            .unwrap()
            .replicas,
        Some(0)
    );
}

#[test]
fn names_that_cannot_name_a_service_are_refused() {
    let mut l = lmd(serde_json::json!({}));
    assert_eq!(invalid_name(&l), None);
    for bad in ["llama.v2", "7b", "x".repeat(64).as_str()] {
        l.metadata.name = Some(bad.to_owned());
        assert!(invalid_name(&l).is_some(), "{bad}");
    }
}
