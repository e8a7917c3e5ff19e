//! What the scheduler reports for metrics: counters, each tenant's load, first admissions.
//! Plain data: the engine turns it into metrics (`engine::observe`).

use super::Scheduler;
use crate::kv::policy::KvPolicy;
use crate::types::{RequestId, TenantId};

/// Counters and gauges for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub preemptions: u64,
    pub steps: u64,
    /// Each tenant's virtual token counter.
    pub counters: Vec<(TenantId, f64)>,
    /// Running and waiting sequences of each tenant that has any.
    pub tenants: Vec<(TenantId, TenantLoad)>,
}

/// One tenant's share of the scheduler's queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLoad {
    pub running: usize,
    pub waiting: usize,
}

/// A request's first admission (reported once; a preempted request's return is not one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub id: RequestId,
    /// The fallback policy it was admitted under, if not the one it asked for.
    pub fallback: Option<KvPolicy>,
}

impl Scheduler {
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.running.len(),
            waiting: self.fair.num_waiting(),
            preemptions: self.preemptions,
            steps: self.steps,
            counters: self.fair.counters(),
            tenants: self.tenant_loads(),
        }
    }

    fn tenant_loads(&self) -> Vec<(TenantId, TenantLoad)> {
        fn slot(out: &mut Vec<(TenantId, TenantLoad)>, t: TenantId) -> &mut TenantLoad {
            let i = match out.iter().position(|(x, _)| *x == t) {
                Some(i) => i,
                None => {
                    out.push((t, TenantLoad::default()));
                    out.len() - 1
                }
            };
            &mut out[i].1
        }
        let mut out = Vec::new();
        for r in &self.running {
            slot(&mut out, self.seqs[r].tenant).running += 1;
        }
        for (t, _) in self.fair.all_waiting() {
            slot(&mut out, t).waiting += 1;
        }
        out.sort_by_key(|(t, _)| *t);
        out
    }
}
