//! Chat prompts: a conversation rendered through the model's own chat template (Jinja, as
//! Hugging Face's `apply_chat_template` renders the `chat_template` of `tokenizer_config.json`
//! and llama.cpp the `tokenizer.chat_template` of a GGUF file), with `minijinja`.
//!
//! The template sees `messages` (a list of `{role, content}`), `add_generation_prompt`,
//! `bos_token` and `eos_token`, and may call `raise_exception(msg)`, as in Hugging Face.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (the template decides what it accepts).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn template_error(what: &str, e: JinjaError) -> Error {
    Error::msg(format!("chat template: {what}: {e:#}"))
}

impl ChatTemplate {
    /// Compile `source`; `bos_token` / `eos_token` are the texts the template may insert.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // Hugging Face templates signal a conversation they refuse with this function.
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| template_error("does not compile", e))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt for `messages`, ending with the assistant's opening when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::input(
                "chat messages",
                "at least one message",
                "none",
            ));
        }
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| template_error("missing", e))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| template_error("rendering the conversation", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ChatML, as SmolLM2's GGUF carries it (a default system turn when there is none).
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_and_without_a_system_turn() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let got = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
             Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let got = t
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi"),
                    ChatMessage::new("assistant", "Hello."),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n"
        );
    }

    #[test]
    fn bad_templates_and_conversations_are_errors() {
        let e = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(e.to_string().contains("chat template"), "{e}");
        let strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be the user') }}{% endif %}ok";
        let t = ChatTemplate::new(strict, "", "").unwrap();
        let e = t
            .render(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(e.to_string().contains("first turn must be the user"), "{e}");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], false).unwrap(),
            "ok"
        );
        let e = t.render(&[], false).unwrap_err();
        assert!(e.to_string().contains("at least one message"), "{e}");
    }
}
