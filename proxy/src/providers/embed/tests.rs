//! Embeddings translations, from the providers' recorded examples (`../testdata/`).

use serde_json::{Value, json};

use super::*;
use crate::providers::{Adapter, UpstreamRequest};

const KEY: &str = "k-secret-123";

macro_rules! fixture {
    ($file:literal) => {
        include_bytes!(concat!("../testdata/", $file))
    };
}

fn embeddings(value: Value) -> EmbeddingsRequest {
    serde_json::from_value(value).unwrap()
}

fn body_json(req: &UpstreamRequest) -> Value {
    serde_json::from_slice(&req.body).unwrap()
}

fn texts(n: usize) -> EmbeddingsRequest {
    let input: Vec<String> = (0..n).map(|i| format!("text {i}")).collect();
    embeddings(json!({"model": "embed", "input": input}))
}

fn floats(response: &EmbeddingsResponse) -> Vec<Vec<f32>> {
    response
        .data
        .iter()
        .map(|d| match &d.embedding {
            Vector::Float(values) => values.clone(),
            Vector::Base64(_) => panic!("expected floats"),
        })
        .collect()
}

fn bad_request(err: ProviderError) -> String {
    match err {
        ProviderError::BadRequest {
            status: 400,
            message,
        } => message,
        other => panic!("expected a 400, got {other:?}"),
    }
}

#[test]
fn every_input_shape_round_trips() {
    for input in [
        json!("one text"),
        json!(["a", "b"]),
        json!([1, 2, 3]),
        json!([[1, 2], [3]]),
    ] {
        let value = json!({"model": "m", "input": input, "encoding_format": "base64",
            "dimensions": 256, "user": "u-1"});
        let req = embeddings(value.clone());
        assert_eq!(serde_json::to_value(&req).unwrap(), value);
    }
    let lens = [
        json!("x"),
        json!(["a", "b"]),
        json!([7, 8]),
        json!([[1], [2], [3]]),
    ]
    .map(|input| {
        embeddings(json!({"model": "m", "input": input}))
            .input
            .len()
    });
    assert_eq!(lens, [1, 2, 1, 3]);
}

#[test]
fn malformed_fields_are_named() {
    for (value, field) in [
        (json!({"model": "m", "input": ["a", 1]}), "`input`"),
        (json!({"model": "m", "input": {"text": "a"}}), "`input`"),
        (
            json!({"model": "m", "input": "a", "encoding_format": "hex"}),
            "`encoding_format`",
        ),
    ] {
        let err = serde_json::from_value::<EmbeddingsRequest>(value).unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[test]
fn validation_refuses_what_no_provider_takes() {
    let too_many = texts(MAX_INPUTS + 1);
    for req in [
        embeddings(json!({"model": "", "input": "a"})),
        embeddings(json!({"model": "m", "input": []})),
        embeddings(json!({"model": "m", "input": ""})),
        embeddings(json!({"model": "m", "input": ["a", ""]})),
        embeddings(json!({"model": "m", "input": [[1], []]})),
        embeddings(json!({"model": "m", "input": "a", "dimensions": 0})),
        too_many,
    ] {
        bad_request(req.validate().unwrap_err());
    }
    texts(MAX_INPUTS).validate().unwrap();
}

#[test]
fn estimates_tokens_per_input() {
    // ceil(9 / 4) + at least one for a one-byte text.
    assert_eq!(
        embeddings(json!({"model": "m", "input": ["nine byte", "x"]})).estimate_tokens(),
        3 + 1
    );
    assert_eq!(
        embeddings(json!({"model": "m", "input": [[1, 2, 3], [4]]})).estimate_tokens(),
        4
    );
}

#[test]
fn base64_is_little_endian_f32() {
    // 1.0f32 is 0x3f800000: bytes 00 00 80 3f.
    assert_eq!(encode_base64(&[1.0]), "AACAPw==");
    let values = [0.5, -2.25, 1e-7, f32::MAX];
    assert_eq!(decode_base64(&encode_base64(&values)).unwrap(), values);
    assert!(matches!(
        decode_base64("AACA"),
        Err(ProviderError::Malformed(_))
    ));
    assert!(matches!(
        decode_base64("not base64!"),
        Err(ProviderError::Malformed(_))
    ));
}

#[test]
fn openai_passes_the_request_through_renamed() {
    let value = json!({
        "model": "embed-small",
        "input": [[101, 102], [103]],
        "encoding_format": "base64",
        "dimensions": 512,
        "user": "u-1",
        "truncate_prompt_tokens": 64
    });
    let built = Adapter::OpenAi
        .build_embeddings_request(
            "https://api.openai.com",
            Some(KEY),
            "text-embedding-3-small",
            &embeddings(value.clone()),
        )
        .unwrap();
    assert_eq!(built.url, "https://api.openai.com/v1/embeddings");
    let auth = &built.headers["authorization"];
    assert_eq!(auth, "Bearer k-secret-123");
    assert!(auth.is_sensitive());
    let mut expected = value;
    expected["model"] = json!("text-embedding-3-small");
    assert_eq!(body_json(&built), expected);

    let keyless = Adapter::OpenAi
        .build_embeddings_request("http://vllm:8000/v1", None, "bge", &texts(1))
        .unwrap();
    assert_eq!(keyless.url, "http://vllm:8000/v1/embeddings");
    assert!(keyless.headers.get("authorization").is_none());
}

#[test]
fn openai_response_is_renamed_and_converted_on_request() {
    let body = fixture!("openai_embeddings_response.json");
    let req = embeddings(json!({"model": "embed", "input": "The food was delicious"}));
    let response = Adapter::OpenAi
        .parse_embeddings_response(body, "embed", &req)
        .unwrap();
    assert_eq!(response.object, "list");
    assert_eq!(response.model, "embed");
    assert_eq!(response.usage, EmbeddingsUsage::new(8));
    assert_eq!(response.data[0].object, "embedding");
    assert_eq!(
        floats(&response),
        [vec![0.002_306_425_5, -0.009_327_292, -0.002_884_222_2]]
    );

    // An upstream that ignored `encoding_format: base64` is encoded by the gateway.
    let mut asked = req.clone();
    asked.encoding_format = Some(EncodingFormat::Base64);
    let encoded = Adapter::OpenAi
        .parse_embeddings_response(body, "embed", &asked)
        .unwrap();
    let Vector::Base64(text) = &encoded.data[0].embedding else {
        panic!("expected base64");
    };
    assert_eq!(decode_base64(text).unwrap(), floats(&response)[0]);

    // Base64 the caller did not ask for is decoded.
    let upstream = json!({"object": "list", "model": "x", "usage": {"prompt_tokens": 1, "total_tokens": 1},
        "data": [{"object": "embedding", "index": 0, "embedding": "AACAPw=="}]});
    let decoded = Adapter::OpenAi
        .parse_embeddings_response(upstream.to_string().as_bytes(), "embed", &req)
        .unwrap();
    assert_eq!(floats(&decoded), [vec![1.0]]);
}

#[test]
fn openai_response_keeps_unmodelled_fields_and_estimates_missing_usage() {
    let upstream = json!({"object": "list", "model": "bge", "id": "embd-1",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]});
    let req = embeddings(json!({"model": "embed", "input": "sixteen bytes!!!"}));
    let response = Adapter::OpenAi
        .parse_embeddings_response(upstream.to_string().as_bytes(), "embed", &req)
        .unwrap();
    assert_eq!(response.extra["id"], "embd-1");
    assert_eq!(response.usage, EmbeddingsUsage::new(4));
    let out = serde_json::to_value(&response).unwrap();
    assert_eq!(out["id"], "embd-1");
}

#[test]
fn a_vector_count_other_than_the_inputs_is_malformed() {
    let body = fixture!("openai_embeddings_response.json");
    let err = Adapter::OpenAi
        .parse_embeddings_response(body, "embed", &texts(2))
        .unwrap_err();
    assert!(matches!(err, ProviderError::Malformed(_)), "{err:?}");
    let err = Adapter::OpenAi
        .parse_embeddings_response(br#"{"error":{"message":"x"}}"#, "embed", &texts(1))
        .unwrap_err();
    assert!(matches!(err, ProviderError::Malformed(_)), "{err:?}");
}

#[test]
fn gemini_batches_one_request_per_input() {
    let req = embeddings(
        json!({"model": "embed", "input": ["Hello", "World"], "dimensions": 768,
        "user": "u-1"}),
    );
    let built = Adapter::Gemini
        .build_embeddings_request(
            "https://generativelanguage.googleapis.com",
            Some(KEY),
            "models/gemini-embedding-001",
            &req,
        )
        .unwrap();
    assert_eq!(
        built.url,
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-embedding-001:batchEmbedContents"
    );
    let key = &built.headers["x-goog-api-key"];
    assert_eq!(key, KEY);
    assert!(key.is_sensitive());
    let request = |text: &str| {
        json!({"model": "models/gemini-embedding-001", "content": {"parts": [{"text": text}]},
            "outputDimensionality": 768})
    };
    assert_eq!(
        body_json(&built),
        json!({"requests": [request("Hello"), request("World")]})
    );

    let plain = Adapter::Gemini
        .build_embeddings_request("http://mock", None, "text-embedding-004", &texts(1))
        .unwrap();
    assert_eq!(
        plain.url,
        "http://mock/v1beta/models/text-embedding-004:batchEmbedContents"
    );
    assert_eq!(
        body_json(&plain)["requests"][0],
        json!({"model": "models/text-embedding-004", "content": {"parts": [{"text": "text 0"}]}})
    );
}

#[test]
fn gemini_refuses_token_ids_big_batches_and_unknown_fields() {
    let gemini = |req: &EmbeddingsRequest| {
        Adapter::Gemini
            .build_embeddings_request("http://mock", Some(KEY), "m", req)
            .unwrap_err()
    };
    let tokens = embeddings(json!({"model": "m", "input": [1, 2, 3]}));
    assert!(bad_request(gemini(&tokens)).contains("`input`"));
    assert!(bad_request(gemini(&texts(gemini::MAX_BATCH + 1))).contains("`input`"));
    let extra = embeddings(json!({"model": "m", "input": "a", "task_type": "x"}));
    assert!(bad_request(gemini(&extra)).contains("`task_type`"));
    Adapter::Gemini
        .build_embeddings_request("http://mock", Some(KEY), "m", &texts(gemini::MAX_BATCH))
        .unwrap();
    // The same refusals before any request is built (and any budget spent).
    for req in [&tokens, &extra] {
        bad_request(Adapter::Gemini.check_embeddings("m", req).unwrap_err());
        bad_request(Adapter::Ollama.check_embeddings("m", req).unwrap_err());
        Adapter::OpenAi.check_embeddings("m", req).unwrap();
    }
    Adapter::Gemini.check_embeddings("m", &texts(3)).unwrap();
}

#[test]
fn gemini_response_has_estimated_usage_and_the_asked_format() {
    let body = fixture!("gemini_batch_embed_response.json");
    let mut req = embeddings(
        json!({"model": "embed", "input": ["What is the meaning of life?", "How much wood?"]}),
    );
    let response = Adapter::Gemini
        .parse_embeddings_response(body, "embed", &req)
        .unwrap();
    assert_eq!(response.model, "embed");
    assert_eq!(
        response.data.iter().map(|d| d.index).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(
        floats(&response)[1],
        [0.005_088_3, -0.017_500_998, -0.004_185_729]
    );
    assert_eq!(response.usage, EmbeddingsUsage::new(req.estimate_tokens()));

    req.encoding_format = Some(EncodingFormat::Base64);
    let encoded = Adapter::Gemini
        .parse_embeddings_response(body, "embed", &req)
        .unwrap();
    let Vector::Base64(text) = &encoded.data[0].embedding else {
        panic!("expected base64");
    };
    assert_eq!(decode_base64(text).unwrap(), floats(&response)[0]);

    let err = Adapter::Gemini
        .parse_embeddings_response(body, "embed", &texts(3))
        .unwrap_err();
    assert!(matches!(err, ProviderError::Malformed(_)), "{err:?}");
}

#[test]
fn ollama_embeds_a_list_without_truncation() {
    let req = embeddings(
        json!({"model": "local-embed", "input": "Why is the sky blue?", "dimensions": 256}),
    );
    let built = Adapter::Ollama
        .build_embeddings_request("http://ollama:11434", None, "nomic-embed-text", &req)
        .unwrap();
    assert_eq!(built.url, "http://ollama:11434/api/embed");
    assert!(built.headers.get("authorization").is_none());
    assert_eq!(
        body_json(&built),
        json!({"model": "nomic-embed-text", "input": ["Why is the sky blue?"], "truncate": false,
            "dimensions": 256})
    );
    let tokens = embeddings(json!({"model": "m", "input": [[1, 2]]}));
    let err = Adapter::Ollama
        .build_embeddings_request("http://ollama:11434", None, "m", &tokens)
        .unwrap_err();
    assert!(bad_request(err).contains("`input`"));
}

#[test]
fn ollama_usage_is_prompt_eval_count_or_estimated() {
    let req = embeddings(
        json!({"model": "local-embed", "input": ["Why is the sky blue?", "Why is the grass green?"]}),
    );
    let body = fixture!("ollama_embed_response.json");
    let response = Adapter::Ollama
        .parse_embeddings_response(body, "local-embed", &req)
        .unwrap();
    assert_eq!(
        floats(&response).iter().map(Vec::len).collect::<Vec<_>>(),
        [10, 10]
    );
    assert_eq!(response.usage, EmbeddingsUsage::new(req.estimate_tokens()));

    let one = embeddings(json!({"model": "local-embed", "input": "Why is the sky blue?"}));
    let counted = br#"{"model":"all-minilm","embeddings":[[0.010071029,-0.0017594862]],"total_duration":14143917,"load_duration":1019500,"prompt_eval_count":8}"#;
    let response = Adapter::Ollama
        .parse_embeddings_response(counted, "local-embed", &one)
        .unwrap();
    assert_eq!(response.usage, EmbeddingsUsage::new(8));
}

#[test]
fn anthropic_has_no_embeddings() {
    assert!(!Adapter::Anthropic.offers_embeddings());
    assert!(Adapter::OpenAi.offers_embeddings() && Adapter::Gemini.offers_embeddings());
    let err = Adapter::Anthropic
        .build_embeddings_request(
            "https://api.anthropic.com",
            Some(KEY),
            "claude-sonnet-4",
            &texts(1),
        )
        .unwrap_err();
    let message = bad_request(err);
    assert!(
        message.contains("claude-sonnet-4") && !message.contains(KEY),
        "{message}"
    );
}

#[test]
fn keys_stay_out_of_debug_output() {
    let built = Adapter::Gemini
        .build_embeddings_request("http://mock", Some(KEY), "m", &texts(1))
        .unwrap();
    assert!(!format!("{built:?}").contains(KEY));
}
