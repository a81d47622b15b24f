//! Progress events from long-running library work (selection, training, evaluation, inference).
//! The library emits events; the CLI decides how to show them (progress bars on a terminal,
//! plain lines otherwise). Tests use [`Silent`] or collect events.

/// One thing that happened.
#[derive(Debug, Clone)]
pub enum Event {
    /// A one-line message for the user (what is being done, and why).
    Info(String),
    /// A phase with `total` steps starts (e.g. "select", "epoch 3/20", "eval").
    PhaseStart { name: String, total: usize },
    /// `done` of the current phase's steps are complete.
    Step {
        done: usize,
        loss: Option<f64>,
        lr: Option<f64>,
        images_per_s: Option<f64>,
    },
    /// The current phase ended; `summary` is a short line for the log.
    PhaseEnd { summary: String },
}

/// Receives [`Event`]s.
pub trait Observer {
    fn event(&mut self, e: Event);

    /// Convenience: an [`Event::Info`].
    fn info(&mut self, msg: impl Into<String>)
    where
        Self: Sized,
    {
        self.event(Event::Info(msg.into()));
    }
}

/// Ignores everything.
#[derive(Debug, Default)]
pub struct Silent;

impl Observer for Silent {
    fn event(&mut self, _e: Event) {}
}

/// Keeps every event (tests).
#[derive(Debug, Default)]
pub struct Recorder {
    pub events: Vec<Event>,
}

impl Observer for Recorder {
    fn event(&mut self, e: Event) {
        self.events.push(e);
    }
}

/// Forwarding helper for `&mut dyn Observer`.
pub fn info(o: &mut dyn Observer, msg: impl Into<String>) {
    o.event(Event::Info(msg.into()));
}
