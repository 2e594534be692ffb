//! HTTP helpers shared by the tests that run the proxy binary (`mod support;`).

use floodgate_e2e::proxy::ProxyProcess;
use std::collections::BTreeSet;

/// GET `path` on the proxy: the status and body; status 0 and the error if none came.
pub async fn get(proxy: &ProxyProcess, path: &str) -> (u16, String) {
    match reqwest::get(proxy.url(path)).await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// The model ids the proxy lists at `/v1/models`.
pub async fn model_ids(proxy: &ProxyProcess) -> BTreeSet<String> {
    let (status, body) = get(proxy, "/v1/models").await;
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}
