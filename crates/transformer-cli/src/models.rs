//! `transformer models`: the model families and their presets.

use transformer::models::{DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig};

pub fn run() -> anyhow::Result<()> {
    println!("encoder_decoder presets: base, big, tiny; base =");
    println!(
        "{}",
        serde_json::to_string_pretty(&EncoderDecoderConfig::base(37000))?
    );
    println!("decoder_only presets: shakespeare_char, gpt2_small, tiny; shakespeare_char =");
    println!(
        "{}",
        serde_json::to_string_pretty(&DecoderOnlyConfig::shakespeare_char(65))?
    );
    println!("encoder_only presets: bert_base, minilm_l6, tiny; bert_base =");
    println!(
        "{}",
        serde_json::to_string_pretty(&EncoderOnlyConfig::bert_base(30522))?
    );
    Ok(())
}
