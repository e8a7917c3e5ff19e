//! The prompt side of a request: a chat conversation rendered through the model's template, a
//! text prompt tokenized, or token ids checked against the vocabulary. Each becomes a
//! [`PromptPlan`] (ids and the text `echo` returns); every refusal is a 400 naming the field.

use super::error::ApiError;
use super::request::{ChatMessageIn, MessageContent};
use super::state::ModelInfo;
use crate::config::ServerSection;
use crate::model::chat_template::ChatMessage;
use crate::types::TokenId;

/// One prompt of a request, tokenized.
#[derive(Debug, Clone)]
pub struct PromptPlan {
    pub ids: Vec<TokenId>,
    /// The prompt's text (echoed back with `echo`).
    pub text: String,
}

/// The chat template's input: text content only, roles checked.
pub fn render_chat(
    messages: &[ChatMessageIn],
    add_generation_prompt: Option<bool>,
    model: &ModelInfo,
    limits: &ServerSection,
) -> Result<String, ApiError> {
    if messages.is_empty() || messages.len() > limits.max_messages {
        return Err(ApiError::invalid(
            "messages",
            format!("give 1 to {} messages", limits.max_messages),
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(ApiError::invalid(
                "messages",
                format!("unknown role `{}`", m.role),
            ));
        }
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => s.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                "messages",
                                format!(
                                    "content parts of type `{kind}` are not supported (text only)"
                                ),
                            ))
                        }
                    }
                }
                s
            }
        };
        // `developer` is OpenAI's newer name for `system`.
        let role = if m.role == "developer" {
            "system"
        } else {
            &m.role
        };
        out.push(ChatMessage::new(role, content));
    }
    let template = model
        .template
        .as_ref()
        .ok_or_else(|| ApiError::invalid("messages", "this model has no chat template"))?;
    let continue_last = messages.last().is_some_and(|m| m.role == "assistant");
    template
        .render(&out, add_generation_prompt.unwrap_or(!continue_last))
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// A text prompt, tokenized with the model's BOS rule.
pub(super) fn text_prompt(model: &ModelInfo, text: &str) -> Result<PromptPlan, ApiError> {
    let ids = model
        .tokenizer
        .encode(text, true)
        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    Ok(PromptPlan {
        ids,
        text: text.to_string(),
    })
}

/// A prompt given as token ids: each inside the vocabulary; its text (for `echo`) decoded.
pub(super) fn id_prompt(model: &ModelInfo, ids: &[u32]) -> Result<PromptPlan, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= model.vocab_size) {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "token id {bad} is outside the vocabulary (size {})",
                model.vocab_size
            ),
        ));
    }
    let text = model
        .tokenizer
        .decode(ids, false)
        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    Ok(PromptPlan {
        ids: ids.to_vec(),
        text,
    })
}
