//! Template answers: a CachePolicy template matches the whole last user message with a
//! regular expression; its response, with `{{name}}` replaced by the named captures, is the
//! answer, and no provider is called.

use crate::providers::types::{ChatRequest, Role};
use regex::Regex;

/// One compiled template.
#[derive(Debug, Clone)]
pub struct Template {
    /// Its name, for logs.
    pub name: String,
    pattern: Regex,
    response: String,
}

/// Why a template cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("CachePolicy template `{name}`: the pattern is not a valid regular expression: {error}")]
pub struct BadTemplate {
    name: String,
    error: String,
}

impl Template {
    /// Compiles `pattern`, anchored so that it must match the whole message.
    pub fn new(name: &str, pattern: &str, response: &str) -> Result<Self, BadTemplate> {
        let anchored = format!("^(?:{pattern})$");
        let pattern = regex::RegexBuilder::new(&anchored)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| BadTemplate {
                name: name.to_owned(),
                error: e.to_string(),
            })?;
        Ok(Self {
            name: name.to_owned(),
            pattern,
            response: response.to_owned(),
        })
    }

    /// The response for `message` if the template matches it.
    pub fn answer(&self, message: &str) -> Option<String> {
        let captures = self.pattern.captures(message)?;
        let mut out = String::with_capacity(self.response.len());
        let mut rest = self.response.as_str();
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let name = after[..end].trim();
            match captures.name(name) {
                Some(m) => out.push_str(m.as_str()),
                // Not a capture of the pattern: left as written.
                None => out.push_str(&rest[start..start + 2 + end + 2]),
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Some(out)
    }
}

/// The first template's answer to the last user message of `req` (trimmed), if any
/// matches. A request that calls tools is never answered by a template.
pub fn answer<'a>(templates: &'a [Template], req: &ChatRequest) -> Option<(&'a Template, String)> {
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return None;
    }
    let last = req.messages.iter().rev().find(|m| m.role == Role::User)?;
    let text = last.text();
    let text = text.trim();
    templates
        .iter()
        .find_map(|t| t.answer(text).map(|a| (t, a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_fill_the_placeholders_and_the_whole_message_must_match() {
        let t = Template::new(
            "hours",
            r"what are your opening hours in (?P<city>\w+)\??",
            "Our {{city}} office is open 9-17. {{nope}}",
        )
        .unwrap();
        assert_eq!(
            t.answer("what are your opening hours in Paris?").as_deref(),
            Some("Our Paris office is open 9-17. {{nope}}")
        );
        assert_eq!(t.answer("so what are your opening hours in Paris?"), None);
        assert_eq!(
            t.answer("what are your opening hours in Paris? and Rome"),
            None
        );
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let e = Template::new("broken", "(unclosed", "x").unwrap_err();
        assert!(e.to_string().contains("`broken`"), "{e}");
    }
}
