//! `transformer models`: the registered model families and their presets.

use std::io::Write;

use transformer::models::FAMILIES;

/// Vocabulary size shown in the example configs (a run takes it from its tokenizer).
const EXAMPLE_VOCAB: usize = 32000;

pub fn run() -> anyhow::Result<()> {
    // `writeln!`, not `println!`: a closed pipe (`| head`) is an error that main ends on
    // quietly, where `println!` would panic.
    let mut out = std::io::stdout().lock();
    for family in FAMILIES {
        let Some(&first) = family.presets.first() else {
            writeln!(out, "{}: no presets", family.name)?;
            continue;
        };
        writeln!(
            out,
            "{} presets: {}; {first} (vocabulary {EXAMPLE_VOCAB}) =",
            family.name,
            family.presets.join(", ")
        )?;
        let cfg = family.preset(first, EXAMPLE_VOCAB)?;
        writeln!(out, "{}", serde_json::to_string_pretty(&cfg.to_json()?)?)?;
    }
    Ok(())
}
