//! Shows library [`Event`]s: an indicatif bar per phase on a terminal (loss, lr, images/s,
//! ETA), plain lines when stderr is not a terminal (CI logs, pipes).

use gps_seg::train::observer::{Event, Observer};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    tty: bool,
    bar: Option<ProgressBar>,
    phase: String,
    total: usize,
    last_line: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            bar: None,
            phase: String::new(),
            total: 0,
            last_line: Instant::now(),
            quiet,
        }
    }
}

fn stats(loss: Option<f64>, lr: Option<f64>, ips: Option<f64>) -> String {
    let mut s = Vec::new();
    if let Some(l) = loss {
        s.push(format!("loss {l:.4}"));
    }
    if let Some(l) = lr {
        s.push(format!("lr {l:.2e}"));
    }
    if let Some(i) = ips {
        s.push(format!("{i:.1} img/s"));
    }
    s.join("  ")
}

impl Observer for Progress {
    fn event(&mut self, e: Event) {
        match e {
            Event::Info(m) => {
                if let Some(b) = &self.bar {
                    b.println(m);
                } else {
                    eprintln!("{m}");
                }
            }
            Event::PhaseStart { name, total } => {
                self.phase = name.clone();
                self.total = total;
                self.last_line = Instant::now();
                if self.tty && !self.quiet {
                    let b = ProgressBar::with_draw_target(
                        Some(total as u64),
                        ProgressDrawTarget::stderr(),
                    );
                    if let Ok(style) = ProgressStyle::with_template(
                        "{prefix:>12} [{bar:30}] {pos}/{len} {msg} (eta {eta})",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                    b.set_prefix(name);
                    self.bar = Some(b);
                }
            }
            Event::Step {
                done,
                loss,
                lr,
                images_per_s,
            } => {
                let msg = stats(loss, lr, images_per_s);
                if let Some(b) = &self.bar {
                    b.set_position(done as u64);
                    b.set_message(msg);
                } else if !self.quiet
                    && (self.last_line.elapsed().as_secs_f64() > 10.0 || done == self.total)
                {
                    eprintln!("{:>12} {done}/{} {msg}", self.phase, self.total);
                    self.last_line = Instant::now();
                }
            }
            Event::PhaseEnd { summary } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                if !summary.is_empty() {
                    eprintln!("{:>12} {summary}", self.phase);
                }
            }
        }
    }
}
