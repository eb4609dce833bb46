//! Progress while training: a bar on a terminal, plain log lines otherwise; the loss plot is
//! redrawn at every evaluation.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use transformer::train::{MetricRecord, Observer};

pub struct CliObserver {
    bar: Option<ProgressBar>,
    plot_path: PathBuf,
    /// What the throughput counts: `tok/s`, or `img/s` for image classification.
    unit: &'static str,
}

impl CliObserver {
    pub fn new(max_steps: u64, start_step: u64, plot_path: PathBuf) -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new(max_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("valid template"),
            );
            bar.set_position(start_step);
            bar
        });
        CliObserver {
            bar,
            plot_path,
            unit: "tok/s",
        }
    }

    /// Report throughput in `unit` (e.g. `img/s`) instead of tokens per second.
    pub fn with_unit(mut self, unit: &'static str) -> Self {
        self.unit = unit;
        self
    }

    fn line(&self, s: String) {
        match &self.bar {
            Some(b) => b.println(s),
            None => println!("{s}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

impl Observer for CliObserver {
    fn on_step(&mut self, step: u64, _max: u64, loss: f64, lr: f64, tps: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step);
            b.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} {}", self.unit));
        }
    }

    fn on_record(&mut self, r: &MetricRecord, all: &[MetricRecord]) {
        match r.val_loss {
            Some(v) => {
                let acc = match r.val_accuracy {
                    Some(a) => format!(" | val accuracy {:.2}%", 100.0 * a),
                    None => String::new(),
                };
                self.line(format!(
                    "step {:>6} | eval | train loss {:.4} | val loss {:.4}{acc}",
                    r.step, r.train_loss, v
                ));
                if let Err(e) = crate::plot::loss_curves(all, &self.plot_path) {
                    self.line(format!(
                        "warning: could not draw {}: {e:#}",
                        self.plot_path.display()
                    ));
                }
                if r.val_accuracy.is_some() {
                    let acc_path = self.plot_path.with_file_name("accuracy.svg");
                    if let Err(e) = crate::plot::accuracy_curve(all, &acc_path) {
                        self.line(format!(
                            "warning: could not draw {}: {e:#}",
                            acc_path.display()
                        ));
                    }
                }
            }
            None if self.bar.is_none() => self.line(format!(
                "step {:>6} | loss {:.4} | lr {:.3e} | {:.0} {} | {:.0}s",
                r.step, r.train_loss, r.lr, r.tokens_per_sec, self.unit, r.elapsed_s
            )),
            None => {}
        }
    }

    fn on_checkpoint(&mut self, dir: &Path, best: bool) {
        if best {
            self.line(format!("saved best checkpoint to {}", dir.display()));
        }
    }
}
