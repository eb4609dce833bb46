//! `transformer chat --model FILE.gguf`: a conversation with an instruct model. Each line
//! of standard input is a user turn; the reply streams to standard output. The whole
//! conversation goes through the model's chat template at every turn; when it no longer fits
//! the context window with room for a reply, the oldest turns after the system prompt are
//! dropped. End of input (Ctrl-D) ends the chat.

use std::io::{BufRead, Write};

use anyhow::{bail, Context, Result};
use clap::Args;
use transformer::decode::{generate, GenerateOptions};
use transformer::pipelines::chat::ChatMessage;
use transformer::rng::Rng;

#[derive(Args)]
pub struct ChatArgs {
    /// An instruct model: a GGUF file that carries its chat template.
    #[command(flatten)]
    model: crate::checkpoint::ModelArgs,
    /// A system turn to start the conversation with (else the template's default, if any).
    #[arg(long)]
    system: Option<String>,
    /// The longest reply, in tokens.
    #[arg(long, default_value_t = 256, allow_hyphen_values = true)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: crate::sampling::SamplingArgs,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let sampling = args.sampling.sampling()?;
    let device = crate::device()?;
    let lm = crate::checkpoint::load_lm(&args.model, &device)?;
    let Some(template) = &lm.chat else {
        bail!(
            "{}: the model has no chat template (a base model?); use `transformer generate`",
            args.model.model.display()
        );
    };
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        use_cache: true,
        ..Default::default()
    };
    let context = lm.model.context_length();
    if args.max_new_tokens >= context {
        bail!(
            "--max-new-tokens {} leaves no room for the conversation in the context window of \
             {context} tokens",
            args.max_new_tokens
        );
    }
    let mut messages: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect();
    let mut rng = Rng::new(args.sampling.seed);
    // Unlocked: the token callback runs on a pool thread (see `generate`).
    let mut out = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading standard input")?;
        if line.trim().is_empty() {
            continue;
        }
        messages.push(ChatMessage::new("user", line));
        let ids = loop {
            let prompt = template.render(&messages, true)?;
            let mut ids = lm
                .tokenizer
                .encode(&prompt)
                .context("the conversation cannot be encoded with this model's tokenizer")?;
            // Templates that write the BOS token themselves (Gemma's) must not get a second.
            if let Some(bos) = lm.bos.filter(|b| ids.first() != Some(b)) {
                ids.insert(0, bos);
            }
            if ids.len() + args.max_new_tokens <= context {
                break ids;
            }
            // Drop the oldest exchange after the system prompt; the new turn always stays.
            let first = usize::from(messages.first().is_some_and(|m| m.role == "system"));
            if messages.len() - first <= 1 {
                messages.pop();
                bail!(
                    "this turn takes {} tokens with the template; with --max-new-tokens {} it \
                     does not fit the context window of {context}",
                    ids.len(),
                    args.max_new_tokens
                );
            }
            let drop = (messages.len() - first - 1).min(2);
            messages.drain(first..first + drop);
        };
        let mut stream = lm.tokenizer.stream_decoder();
        let mut reply = String::new();
        let mut write_err: Option<std::io::Error> = None;
        generate(lm.model.as_ref(), &ids, &opts, &device, &mut rng, |id| {
            if lm.stop.contains(&id) {
                return Ok(false);
            }
            let piece = stream.push(id)?;
            reply.push_str(&piece);
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                write_err = Some(e);
                return Ok(false);
            }
            Ok(true)
        })?;
        if let Some(e) = write_err {
            return Err(e.into());
        }
        let rest = stream.finish()?;
        reply.push_str(&rest);
        writeln!(out, "{rest}")?;
        messages.push(ChatMessage::new("assistant", reply));
    }
    Ok(())
}
