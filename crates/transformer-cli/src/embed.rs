//! `transformer embed --model DIR`: sentence embeddings of the lines of stdin, one JSON object
//! per line (`{"embedding": [...]}`), in input order, as sentence-transformers computes them.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use transformer::models::Pooling;
use transformer::nn::Precision;
use transformer::pipelines::embed::{EmbedOptions, HfBert};

#[derive(Args)]
pub struct EmbedArgs {
    /// A Hugging Face BERT model directory: config.json, model.safetensors (or
    /// pytorch_model.bin) and tokenizer.json, plus the sentence-transformers files when present
    /// (modules.json, 1_Pooling/config.json, sentence_bert_config.json).
    #[arg(long)]
    model: PathBuf,
    /// Pooling of the token states [default: the model's 1_Pooling/config.json, else mean].
    #[arg(long, value_enum)]
    pooling: Option<PoolingArg>,
    /// L2-normalize the embeddings [default: on when modules.json lists a Normalize module].
    #[arg(long, conflicts_with = "no_normalize")]
    normalize: bool,
    /// Do not L2-normalize, even if modules.json lists a Normalize module.
    #[arg(long)]
    no_normalize: bool,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32, allow_hyphen_values = true)]
    batch_size: usize,
    /// Truncate texts to this many tokens, [CLS] and [SEP] included [default: the model's
    /// max_seq_length from sentence_bert_config.json, else max_position_embeddings].
    #[arg(long, allow_hyphen_values = true)]
    max_length: Option<usize>,
    /// Precision of the encoder's matrix products: f32, or bf16 inputs with f32 accumulation
    /// (Intel AMX where the CPU has it, else emulated at f32 speed). Norms, softmax, pooling
    /// and the output stay f32.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum PoolingArg {
    /// The mean of the token states, padding excluded.
    Mean,
    /// The state of the first token ([CLS]).
    Cls,
}

/// Lines read and embedded together: sorting them by length keeps the padding of each batch
/// small, and a bounded chunk keeps memory flat and output flowing on long inputs.
const BATCHES_PER_CHUNK: usize = 64;

#[derive(Serialize)]
struct Output<'a> {
    embedding: &'a [f32],
}

pub fn run(args: EmbedArgs) -> Result<()> {
    let device = crate::device()?;
    let model = HfBert::load(&args.model, &device)
        .with_context(|| format!("loading the model {}", args.model.display()))?;
    let opts = options(&args, &model);
    if opts.precision == Precision::Bf16 && !transformer::kernels::bf16::has_amx() {
        eprintln!(
            "note: --dtype bf16: this CPU (or its OS) offers no AMX tile unit; the bf16 products \
             are emulated in f32 (the same results, no speed-up)"
        );
    }
    // Check the options now, before reading any input, so that a bad flag fails at once.
    model
        .check_options(&opts)
        .context("invalid --batch-size or --max-length")?;

    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let chunk = opts.batch_size.saturating_mul(BATCHES_PER_CHUNK);
    let mut lines: Vec<String> = Vec::with_capacity(chunk);
    let mut line_no = 0usize;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = input.read_until(b'\n', &mut buf).context("reading stdin")?;
        if n > 0 {
            line_no += 1;
            lines.push(line_text(&mut buf, line_no)?);
        }
        if (n == 0 && !lines.is_empty()) || lines.len() == chunk {
            let texts: Vec<&str> = lines.iter().map(String::as_str).collect();
            let emb = model.embed(&texts, &opts).with_context(|| {
                format!("embedding lines {}..={line_no}", line_no + 1 - lines.len())
            })?;
            for row in emb.to_vec2::<f32>()? {
                // Serialized apart from the write, so that a closed pipe surfaces as the
                // io::Error that main treats as a normal stop (serde_json would wrap it).
                let mut line = serde_json::to_vec(&Output { embedding: &row })?;
                line.push(b'\n');
                out.write_all(&line)?;
            }
            out.flush()?;
            lines.clear();
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// The model's sentence-transformers defaults, overridden by the flags.
fn options(args: &EmbedArgs, model: &HfBert) -> EmbedOptions {
    let mut opts = model.embed_options();
    if let Some(p) = args.pooling {
        opts.pooling = match p {
            PoolingArg::Mean => Pooling::Mean,
            PoolingArg::Cls => Pooling::Cls,
        };
    }
    if args.normalize {
        opts.normalize = true;
    }
    if args.no_normalize {
        opts.normalize = false;
    }
    opts.batch_size = args.batch_size;
    opts.precision = match args.dtype {
        DtypeArg::F32 => Precision::F32,
        DtypeArg::Bf16 => Precision::Bf16,
    };
    if let Some(n) = args.max_length {
        opts.max_length = n;
    }
    opts
}

/// One line of stdin without its line ending (`\n` or `\r\n`), which must be UTF-8.
fn line_text(buf: &mut Vec<u8>, line_no: usize) -> Result<String> {
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    String::from_utf8(std::mem::take(buf)).map_err(|e| {
        anyhow::anyhow!(
            "stdin line {line_no}: invalid UTF-8 at byte {} of the line (input must be UTF-8 \
             text, one text per line)",
            e.utf8_error().valid_up_to() + 1
        )
    })
}
