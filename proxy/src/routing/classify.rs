//! Stage 3: the prompt's class (simple, medium, complex, code) by rules users expect, compiled
//! once per configuration from the RoutingPolicy's `classifier`:
//!
//! 1. **code**: a code fence (```` ``` ````), a line that reads like code (`def f(`,
//!    `fn main`, `#include`, a statement ending in `;`, a line ending in `{`, `=>`, ...), or
//!    a code term (`python`, `function`, `regex`, `stack trace`, `my code`, ...);
//! 2. **complex**: multi-step wording (`first ... then ...`, `finally`, `step by step`),
//!    design vocabulary (`architecture`, `trade-off`, `design`, ...), or longer than
//!    `complexMinChars`;
//! 3. **simple**: shorter than `simpleMaxChars` (100 by default);
//! 4. **medium**: everything else.
//!
//! The wording (code, multi-step, terms) is read from the last user message: what the caller
//! asks now. The lengths (1-3) are those of the whole conversation, its user and assistant
//! turns: a short follow-up ("and then?") to a long exchange asks a model to read all of it,
//! and is not simple. A system prompt is not counted (it is the same for every request of an
//! application, and says nothing of this question's difficulty).

use crate::providers::types::{ChatRequest, Role};
use floodgate_crds::local_model::PromptClass;
use floodgate_crds::routing::Classifier as Settings;
use std::collections::HashSet;

/// Terms that mark code, before the resource's own. Words that are as common in prose
/// ("dress code", "rust on my bike", "a film script", "debug" of a car) are only counted in
/// phrases that name code.
const CODE_TERMS: &[&str] = &[
    "function",
    "python",
    "javascript",
    "typescript",
    "golang",
    "c++",
    "sql",
    "regex",
    "bash",
    "compile",
    "compiler",
    "stack trace",
    "traceback",
    "refactor",
    "unit test",
    "my code",
    "this code",
    "the code below",
    "code snippet",
    "code review",
    "source code",
    "rust code",
    "in rust",
    "rust program",
    "java code",
    "in java",
    "shell script",
    "bash script",
    "python script",
    "debug this",
    "debug my",
    "debugging",
];

/// Terms that mark a complex prompt, before the resource's own.
const COMPLEX_TERMS: &[&str] = &[
    "design",
    "architecture",
    "architect",
    "trade-off",
    "trade-offs",
    "tradeoff",
    "tradeoffs",
    "pros and cons",
    "step by step",
    "step-by-step",
    "analyze",
    "analyse",
    "evaluate",
    "strategy",
    "in depth",
    "scalable",
    "compare and contrast",
];

/// Line openings that read like code.
const CODE_OPENINGS: &[&str] = &[
    "def ",
    "fn ",
    "pub fn ",
    "async fn ",
    "class ",
    "#include",
    "import ",
    "function ",
    "const ",
    "let ",
    "var ",
    "func ",
    "package ",
    "if (",
    "for (",
    "while (",
];

/// A compiled classifier.
#[derive(Debug, Clone)]
pub struct Classifier {
    simple_max_chars: usize,
    complex_min_chars: usize,
    code_words: HashSet<String>,
    code_phrases: Vec<String>,
    complex_words: HashSet<String>,
    complex_phrases: Vec<String>,
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new(&Settings::default())
    }
}

impl Classifier {
    /// Compiles `settings` (the defaults plus the resource's terms).
    pub fn new(settings: &Settings) -> Self {
        let split = |defaults: &[&str], extra: &[String]| {
            let mut words = HashSet::new();
            let mut phrases = Vec::new();
            let all = defaults
                .iter()
                .map(|s| s.to_string())
                .chain(extra.iter().cloned());
            for term in all {
                let term = term.trim().to_lowercase();
                if term.is_empty() {
                    continue;
                }
                if term.contains(' ') {
                    phrases.push(term);
                } else {
                    words.insert(term);
                }
            }
            (words, phrases)
        };
        let (code_words, code_phrases) = split(CODE_TERMS, &settings.code_terms);
        let (complex_words, complex_phrases) = split(COMPLEX_TERMS, &settings.complex_terms);
        Self {
            simple_max_chars: settings.simple_max_chars as usize,
            complex_min_chars: settings.complex_min_chars as usize,
            code_words,
            code_phrases,
            complex_words,
            complex_phrases,
        }
    }

    /// The class of `req`'s prompt: the wording of its last user message, the length of
    /// its conversation.
    pub fn classify(&self, req: &ChatRequest) -> PromptClass {
        let prompt = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.text())
            .unwrap_or_default();
        let conversation: usize = req
            .messages
            .iter()
            .filter(|m| matches!(m.role, Role::User | Role::Assistant))
            .map(|m| m.text().chars().count())
            .sum();
        self.classify_parts(&prompt, conversation)
    }

    /// The class of a prompt's text (a conversation of this one message).
    pub fn classify_text(&self, text: &str) -> PromptClass {
        self.classify_parts(text, text.chars().count())
    }

    /// The class of a prompt worded `text` in a conversation of `chars` characters.
    fn classify_parts(&self, text: &str, chars: usize) -> PromptClass {
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower
            .split(|c: char| !(c.is_alphanumeric() || c == '+' || c == '-' || c == '#'))
            .filter(|w| !w.is_empty())
            .collect();
        let has = |set: &HashSet<String>, phrases: &[String]| {
            words.iter().any(|w| set.contains(*w)) || phrases.iter().any(|p| lower.contains(p))
        };
        if lower.contains("```")
            || looks_like_code(text)
            || has(&self.code_words, &self.code_phrases)
        {
            return PromptClass::Code;
        }
        let multi_step =
            words.contains(&"first") && (words.contains(&"then") || words.contains(&"finally"));
        if multi_step
            || chars >= self.complex_min_chars
            || has(&self.complex_words, &self.complex_phrases)
        {
            return PromptClass::Complex;
        }
        if chars < self.simple_max_chars {
            PromptClass::Simple
        } else {
            PromptClass::Medium
        }
    }
}

/// Whether a line of `text` reads like code rather than prose.
fn looks_like_code(text: &str) -> bool {
    text.lines().any(|line| {
        let t = line.trim();
        let lower = t.to_lowercase();
        t == "}"
            || (t.len() > 1 && t.ends_with('{'))
            || statement(t)
            || t.contains("=>")
            || t.contains("()")
            || t.contains("!=")
            || t.contains("==")
            || CODE_OPENINGS
                .iter()
                .any(|o| lower.strip_prefix(o).is_some_and(code_tail))
    })
}

/// Whether a line reads like a statement ending in `;`: with brackets or `=` (`x = f(y);`),
/// or at most two words (`return x;`, `i++;`). A line of prose ending in `;` is not code.
fn statement(t: &str) -> bool {
    t.len() > 1
        && t.ends_with(';')
        && (t.contains(['(', '=', '[']) || t.split_whitespace().count() <= 2)
}

/// Whether what follows a code-like opening looks like an identifier and syntax, not prose:
/// the rest holds a bracket, `=` or `:`.
fn code_tail(rest: &str) -> bool {
    rest.contains(['(', '=', ':', '{', '<', '*', '"', '\''])
}

/// The name of a class, for headers and metric labels.
pub fn name(class: PromptClass) -> &'static str {
    match class {
        PromptClass::Simple => "simple",
        PromptClass::Medium => "medium",
        PromptClass::Complex => "complex",
        PromptClass::Code => "code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> PromptClass {
        Classifier::default().classify_text(text)
    }

    #[test]
    fn a_short_prompt_without_code_is_simple() {
        assert_eq!(class("What is the capital of France?"), PromptClass::Simple);
        // 99 characters: simple; 100: medium.
        assert_eq!(class(&"a".repeat(99)), PromptClass::Simple);
        assert_eq!(class(&"a".repeat(100)), PromptClass::Medium);
    }

    #[test]
    fn a_code_fence_or_code_like_line_is_code() {
        assert_eq!(class("```\nx = 1\n```"), PromptClass::Code);
        assert_eq!(
            class("why does this fail?\nint x = f(y);"),
            PromptClass::Code
        );
        assert_eq!(class("def add(a, b):\n  return a + b"), PromptClass::Code);
        assert_eq!(class("Write a python one-liner"), PromptClass::Code);
        assert_eq!(class("what does the traceback mean"), PromptClass::Code);
        // Prose that only starts with a code-like word is not code.
        assert_eq!(class("Let me know how you are"), PromptClass::Simple);
    }

    #[test]
    fn prose_with_words_code_also_uses_is_not_code() {
        for prose in [
            "What is the dress code?",
            "How do I get rust off my bike?",
            "Who wrote the script of Casablanca?",
            "I went home; it was late;",
            "Is the Java coffee good?",
        ] {
            assert_ne!(class(prose), PromptClass::Code, "{prose}");
        }
        for code in [
            "Can you review my code?",
            "Write it in rust",
            "return x;",
            "}",
            "Help me with debugging",
        ] {
            assert_eq!(class(code), PromptClass::Code, "{code}");
        }
    }

    #[test]
    fn multi_step_wording_or_design_vocabulary_is_complex() {
        assert_eq!(
            class("First summarise the text, then list the names"),
            PromptClass::Complex
        );
        assert_eq!(class("first gather, finally report"), PromptClass::Complex);
        assert_eq!(
            class("Explain the trade-offs of this"),
            PromptClass::Complex
        );
        assert_eq!(
            class("Walk me through it step by step"),
            PromptClass::Complex
        );
        // "then" alone is not multi-step.
        assert_eq!(class("and then what?"), PromptClass::Simple);
    }

    #[test]
    fn a_long_prompt_is_complex_and_code_wins_over_complex() {
        assert_eq!(class(&"word ".repeat(1000)), PromptClass::Complex);
        assert_eq!(
            class("Design the architecture, then write the rust code"),
            PromptClass::Code
        );
    }

    #[test]
    fn otherwise_medium() {
        let prose = "Tell me about the history of the city of Lyon, its food, its rivers and \
                     the people who lived there in the middle ages.";
        assert!(prose.len() >= 100);
        assert_eq!(class(prose), PromptClass::Medium);
    }

    #[test]
    fn the_resource_tunes_the_thresholds_and_terms() {
        let c = Classifier::new(&Settings {
            simple_max_chars: 10,
            complex_min_chars: 50,
            complex_terms: vec!["Quarterly Plan".into()],
            code_terms: vec!["kubectl".into()],
        });
        assert_eq!(c.classify_text("hello you"), PromptClass::Simple);
        assert_eq!(c.classify_text("hello there"), PromptClass::Medium);
        assert_eq!(c.classify_text(&"x".repeat(50)), PromptClass::Complex);
        assert_eq!(c.classify_text("our quarterly plan"), PromptClass::Complex);
        assert_eq!(c.classify_text("kubectl get pods"), PromptClass::Code);
    }

    #[test]
    fn the_last_user_message_is_the_prompt() {
        use crate::providers::types::{ChatMessage, MessageContent};
        let msg =
            |role, text: &str| ChatMessage::new(role, Some(MessageContent::Text(text.into())));
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": []
        }))
        .unwrap();
        let req = ChatRequest {
            messages: vec![
                msg(
                    Role::System,
                    "You are a senior architect; design with care.",
                ),
                msg(Role::User, "```rust\nfn main() {}\n```"),
                msg(Role::Assistant, "ok"),
                msg(Role::User, "thanks!"),
            ],
            ..req
        };
        assert_eq!(Classifier::default().classify(&req), PromptClass::Simple);
    }

    #[test]
    fn a_short_follow_up_to_a_long_conversation_is_not_simple() {
        use crate::providers::types::{ChatMessage, MessageContent};
        let msg = |role, text: String| ChatMessage::new(role, Some(MessageContent::Text(text)));
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": []
        }))
        .unwrap();
        let long = "The river runs north past the old mill and the town. ".repeat(8);
        let with = |history: String| ChatRequest {
            messages: vec![
                msg(Role::System, "You are helpful. ".repeat(20)),
                msg(Role::User, history),
                msg(Role::Assistant, "It does.".into()),
                msg(Role::User, "and then?".into()),
            ],
            ..req.clone()
        };
        let c = Classifier::default();
        // 432 + 8 + 9 characters of conversation: medium, though the question is short.
        assert_eq!(c.classify(&with(long)), PromptClass::Medium);
        // A short exchange stays simple, however long the system prompt.
        assert_eq!(
            c.classify(&with("Where is the mill?".into())),
            PromptClass::Simple
        );
    }
}
