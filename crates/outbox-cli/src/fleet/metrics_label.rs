//! A `database="NAME"` label on every metric a database's relay records.
//!
//! The engine records through the `metrics` facade with no notion of which database it serves.
//! Each relay thread runs a single-threaded runtime and sets, for that thread, a recorder that
//! adds the label and hands over to the process's Prometheus recorder; so the label reaches every
//! metric, including those of the engine's background tasks (same thread), without the engine
//! knowing.

use std::sync::Arc;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{PrometheusHandle, PrometheusRecorder};

/// The process's Prometheus recorder, shared by the relay threads.
#[derive(Clone)]
pub struct SharedRecorder(Arc<PrometheusRecorder>);

impl SharedRecorder {
    /// Scrape handle.
    pub fn handle(&self) -> PrometheusHandle {
        self.0.handle()
    }
    /// The recorder a relay thread sets for the database `name`.
    pub fn for_database(&self, name: &str) -> DatabaseRecorder {
        DatabaseRecorder {
            inner: self.0.clone(),
            label: Label::new("database", name.to_string()),
        }
    }
}

/// Installs the Prometheus recorder as the global one (for what is recorded outside the relay
/// threads) and returns it for the threads.
pub fn install() -> anyhow::Result<SharedRecorder> {
    let recorder = Arc::new(crate::http::prometheus_builder()?.build_recorder());
    metrics::set_global_recorder(recorder.clone())
        .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed in this process"))?;
    outbox::telemetry::describe();
    Ok(SharedRecorder(recorder))
}

/// Adds `database="NAME"` to every key, then records into the shared Prometheus recorder.
pub struct DatabaseRecorder {
    inner: Arc<PrometheusRecorder>,
    label: Label,
}

impl DatabaseRecorder {
    fn key(&self, key: &Key) -> Key {
        key.with_extra_labels(vec![self.label.clone()])
    }
}

impl Recorder for DatabaseRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.inner.register_counter(&self.key(key), metadata)
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(&self.key(key), metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.inner.register_histogram(&self.key(key), metadata)
    }
}
