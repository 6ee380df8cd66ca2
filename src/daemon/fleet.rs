//! The running connectors, and reloading them from the connectors folder (SIGHUP): added files
//! start, removed files stop, changed files restart; a file that no longer loads is reported and
//! its old version keeps running.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::Context;
use super::coordinator::folder_hash;
use super::reconciler::reconciler;
use super::worker::{EntityLock, worker};
use crate::config::{self, ConnectorPlan, Settings};
use crate::model::Entity;
use crate::source::Source;
use crate::telemetry;

struct Running {
    broker: String,
    entities: Vec<Entity>,
    fingerprint: u64,
    stop: CancellationToken,
}

pub struct Fleet {
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    running: HashMap<PathBuf, Running>,
    /// One lock per (broker, entity), kept across reloads: a restarted connector's new worker
    /// cannot start a run while the old one is still finishing its page.
    locks: Mutex<BTreeMap<(String, Entity), EntityLock>>,
}

impl Fleet {
    pub fn new(ctx: Arc<Context>, shutdown: CancellationToken) -> Fleet {
        Fleet {
            ctx,
            shutdown,
            running: HashMap::new(),
            locks: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Brings the running set in line with the connectors folder.
    pub fn reload(&mut self, settings: &Settings) {
        let (plans, problems) = config::load_connectors(settings);
        for problem in &problems {
            let kept = self.running.contains_key(&problem.file);
            error!(%problem, kept_running = kept, "Connector file is invalid; its previous version (if any) keeps running.");
        }
        let broken: Vec<PathBuf> = problems.iter().map(|p| p.file.clone()).collect();
        let wanted: HashMap<PathBuf, ConnectorPlan> = plans
            .into_iter()
            .filter(|p| p.enabled)
            .map(|p| (p.file.clone(), p))
            .collect();
        // Stop what is gone (and not merely broken) or changed.
        let files: Vec<PathBuf> = self.running.keys().cloned().collect();
        for file in files {
            let changed = match wanted.get(&file) {
                Some(plan) => plan.fingerprint != self.running[&file].fingerprint,
                None => !broken.contains(&file),
            };
            if changed && let Some(old) = self.running.remove(&file) {
                info!(broker = %old.broker, file = %file.display(), "Stopping connector.");
                old.stop.cancel();
                self.ctx.health.forget(&old.broker);
            }
        }
        for (file, plan) in wanted {
            if self.running.contains_key(&file) {
                continue;
            }
            match self.start(plan) {
                Ok(running) => {
                    info!(broker = %running.broker, file = %file.display(), "Connector started.");
                    self.running.insert(file, running);
                }
                Err(e) => error!(file = %file.display(), error = %e, "Connector cannot start."),
            }
        }
        if let Some(coordinator) = &self.ctx.coordinator {
            let pairs = self
                .running
                .values()
                .flat_map(|r| r.entities.iter().map(|&e| (r.broker.clone(), e)))
                .collect();
            coordinator.set_work(pairs, folder_hash(&settings.connectors_dir));
        }
    }

    fn start(&self, plan: ConnectorPlan) -> anyhow::Result<Running> {
        let source: Arc<dyn Source> = crate::source::for_plan(&plan)?;
        let sink = self
            .ctx
            .sinks
            .for_connector(&plan)
            .map_err(anyhow::Error::msg)?;
        let stop = self.shutdown.child_token();
        let plan = Arc::new(plan);
        telemetry::connector_started(&plan.broker, &plan.entities);
        let reconciled: Vec<(Entity, EntityLock)> = plan
            .reconcile
            .entities
            .iter()
            .map(|&e| (e, self.lock(&plan.broker, e)))
            .collect();
        if plan.reconcile.schedule.is_some() && !reconciled.is_empty() {
            self.ctx.tracker.spawn(reconciler(
                Arc::clone(&self.ctx),
                Arc::clone(&plan),
                Arc::clone(&source),
                Arc::clone(&sink),
                reconciled,
                stop.clone(),
            ));
        }
        for entity in plan.entities.iter().copied() {
            let lock = self.lock(&plan.broker, entity);
            self.ctx.tracker.spawn(worker(
                Arc::clone(&self.ctx),
                Arc::clone(&plan),
                Arc::clone(&source),
                Arc::clone(&sink),
                entity,
                lock,
                stop.clone(),
            ));
        }
        Ok(Running {
            broker: plan.broker.clone(),
            entities: plan.entities.clone(),
            fingerprint: plan.fingerprint,
            stop,
        })
    }

    fn lock(&self, broker: &str, entity: Entity) -> EntityLock {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry((broker.to_owned(), entity)).or_default())
    }
}
