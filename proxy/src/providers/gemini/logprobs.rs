//! Gemini's `logprobsResult` (asked for with `responseLogprobs`) in OpenAI's
//! `choices[].logprobs` shape: one entry per decoding step, the chosen token with its log
//! probability and UTF-8 bytes, and the step's top candidates.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `Candidate.logprobsResult`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LogprobsResult {
    /// The chosen token at each decoding step.
    #[serde(default)]
    chosen_candidates: Vec<TokenLogprob>,
    /// The most likely tokens at each decoding step (when `logprobs` was set).
    #[serde(default)]
    top_candidates: Vec<TopCandidates>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenLogprob {
    #[serde(default)]
    token: String,
    #[serde(default)]
    log_probability: f64,
}

#[derive(Debug, Deserialize)]
struct TopCandidates {
    #[serde(default)]
    candidates: Vec<TokenLogprob>,
}

/// OpenAI's `logprobs` object of a choice.
#[derive(Serialize)]
struct OpenAiLogprobs<'a> {
    content: Vec<OpenAiToken<'a>>,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct OpenAiToken<'a> {
    token: &'a str,
    logprob: f64,
    bytes: &'a [u8],
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<Vec<OpenAiToken<'a>>>,
}

impl<'a> OpenAiToken<'a> {
    fn new(t: &'a TokenLogprob, top_logprobs: Option<Vec<OpenAiToken<'a>>>) -> Self {
        OpenAiToken {
            token: &t.token,
            logprob: t.log_probability,
            bytes: t.token.as_bytes(),
            top_logprobs,
        }
    }
}

impl LogprobsResult {
    /// The OpenAI `logprobs` object; `None` when Gemini reported no steps.
    pub(super) fn to_openai(&self) -> Option<Value> {
        if self.chosen_candidates.is_empty() {
            return None;
        }
        let content = self
            .chosen_candidates
            .iter()
            .enumerate()
            .map(|(step, chosen)| {
                let top = self
                    .top_candidates
                    .get(step)
                    .map(|top| top.candidates.iter().map(|t| OpenAiToken::new(t, None)));
                OpenAiToken::new(chosen, Some(top.into_iter().flatten().collect()))
            })
            .collect();
        serde_json::to_value(OpenAiLogprobs {
            content,
            refusal: None,
        })
        .ok()
    }
}
