//! Fair share between tenants: the Virtual Token Counter (Sheng et al., "Fairness in Serving
//! Large Language Models", OSDI '24) and the per-tenant waiting queues it picks from.
//!
//! Each tenant has a counter of service received: prompt tokens × 1 at admission plus generated
//! tokens × 2, each divided by the tenant's weight. The scheduler admits from the tenant with the
//! lowest counter. A tenant that becomes active again (it had nothing waiting or running) is
//! lifted to the lowest counter among the active tenants, so idling banks no credit. Within a
//! tenant, requests go by `priority` (lower first), then arrival.

use crate::types::{RequestId, TenantId};
use std::collections::{BTreeMap, BTreeSet};

/// VTC prices (the paper's defaults): a generated token costs twice a prompt token.
pub const PROMPT_PRICE: f64 = 1.0;
pub const OUTPUT_PRICE: f64 = 2.0;

/// A waiting request's place in its tenant's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WaitKey {
    pub priority: i32,
    /// Arrival order (a counter, not a clock: ties never depend on timer resolution).
    pub arrival: u64,
    pub id: RequestId,
}

#[derive(Debug)]
struct TenantQueue {
    weight: f64,
    counter: f64,
    waiting: BTreeSet<WaitKey>,
    running: usize,
}

impl TenantQueue {
    fn active(&self) -> bool {
        !self.waiting.is_empty() || self.running > 0
    }
}

/// Per-tenant waiting queues and virtual token counters.
#[derive(Debug, Default)]
pub struct FairQueue {
    tenants: BTreeMap<TenantId, TenantQueue>,
    waiting: usize,
}

impl FairQueue {
    /// Known tenants and their weights; a tenant not listed gets weight 1 on first use.
    pub fn new(weights: &[(TenantId, f64)]) -> Self {
        let mut q = Self::default();
        for &(t, w) in weights {
            q.tenant(t).weight = if w.is_finite() && w > 0.0 { w } else { 1.0 };
        }
        q
    }

    fn tenant(&mut self, t: TenantId) -> &mut TenantQueue {
        self.tenants.entry(t).or_insert(TenantQueue {
            weight: 1.0,
            counter: 0.0,
            waiting: BTreeSet::new(),
            running: 0,
        })
    }

    /// Lifts `t` to the lowest counter of the other active tenants if it is inactive.
    fn lift_if_inactive(&mut self, t: TenantId) {
        if self.tenants.get(&t).is_some_and(TenantQueue::active) {
            return;
        }
        let floor = self
            .tenants
            .iter()
            .filter(|(u, q)| **u != t && q.active())
            .map(|(_, q)| q.counter)
            .fold(f64::INFINITY, f64::min);
        let q = self.tenant(t);
        if floor.is_finite() && floor > q.counter {
            q.counter = floor;
        }
    }

    /// Queues a request (new, or preempted and coming back).
    pub fn push(&mut self, t: TenantId, key: WaitKey) {
        self.lift_if_inactive(t);
        if self.tenant(t).waiting.insert(key) {
            self.waiting += 1;
        }
    }

    /// Takes a request out of its tenant's queue (admitted, expired or aborted).
    pub fn remove(&mut self, t: TenantId, key: &WaitKey) -> bool {
        let removed = self.tenant(t).waiting.remove(key);
        if removed {
            self.waiting -= 1;
        }
        removed
    }

    /// A sequence of `t` entered (`+1`) or left (`-1`) the running batch.
    pub fn running_changed(&mut self, t: TenantId, entered: bool) {
        if entered {
            self.lift_if_inactive(t);
        }
        let q = self.tenant(t);
        if entered {
            q.running += 1;
        } else {
            debug_assert!(q.running > 0, "fair: running below zero");
            q.running = q.running.saturating_sub(1);
        }
    }

    /// Records service: `tokens` at `price` each, divided by the tenant's weight.
    pub fn charge(&mut self, t: TenantId, tokens: usize, price: f64) {
        let q = self.tenant(t);
        q.counter += tokens as f64 * price / q.weight;
    }

    pub fn counter(&self, t: TenantId) -> f64 {
        self.tenants.get(&t).map_or(0.0, |q| q.counter)
    }

    /// Tenants with waiting requests, lowest counter first (ties: lower tenant id).
    pub fn tenants_by_counter(&self) -> Vec<TenantId> {
        let mut ts: Vec<(f64, TenantId)> = self
            .tenants
            .iter()
            .filter(|(_, q)| !q.waiting.is_empty())
            .map(|(t, q)| (q.counter, *t))
            .collect();
        ts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        ts.into_iter().map(|(_, t)| t).collect()
    }

    /// `t`'s waiting requests in admission order.
    pub fn waiting_of(&self, t: TenantId) -> impl Iterator<Item = &WaitKey> {
        self.tenants
            .get(&t)
            .into_iter()
            .flat_map(|q| q.waiting.iter())
    }

    /// Every waiting request, by tenant.
    pub fn all_waiting(&self) -> impl Iterator<Item = (TenantId, &WaitKey)> {
        self.tenants
            .iter()
            .flat_map(|(t, q)| q.waiting.iter().map(move |k| (*t, k)))
    }

    /// Requests waiting, over all tenants.
    pub fn num_waiting(&self) -> usize {
        self.waiting
    }

    /// `(tenant, counter)` for every tenant seen so far.
    pub fn counters(&self) -> Vec<(TenantId, f64)> {
        self.tenants.iter().map(|(t, q)| (*t, q.counter)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(arrival: u64, priority: i32) -> WaitKey {
        WaitKey {
            priority,
            arrival,
            id: RequestId(arrival),
        }
    }

    #[test]
    fn lowest_counter_first_and_weights_divide_charges() {
        let (a, b) = (TenantId(0), TenantId(1));
        let mut q = FairQueue::new(&[(a, 1.0), (b, 2.0)]);
        q.push(a, key(0, 0));
        q.push(b, key(1, 0));
        q.charge(a, 10, PROMPT_PRICE);
        q.charge(b, 10, OUTPUT_PRICE);
        assert_eq!(q.counter(a), 10.0);
        assert_eq!(q.counter(b), 10.0); // 10 × 2 / 2
        assert_eq!(q.tenants_by_counter(), vec![a, b]); // tie → lower id
        q.charge(a, 1, PROMPT_PRICE);
        assert_eq!(q.tenants_by_counter(), vec![b, a]);
    }

    #[test]
    fn returning_tenant_is_lifted_to_the_active_minimum() {
        let (a, b, c) = (TenantId(0), TenantId(1), TenantId(2));
        let mut q = FairQueue::new(&[]);
        q.push(a, key(0, 0));
        q.push(b, key(1, 0));
        q.charge(a, 100, PROMPT_PRICE);
        q.charge(b, 40, PROMPT_PRICE);
        // c was idle: it starts at the lowest active counter, not at 0.
        q.push(c, key(2, 0));
        assert_eq!(q.counter(c), 40.0);
        // An active tenant is never lifted.
        assert!(q.remove(b, &key(1, 0)));
        q.running_changed(b, true);
        q.push(b, key(3, 0));
        assert_eq!(q.counter(b), 40.0);
        // A tenant that went idle and returns is lifted (b is the minimum among the others).
        assert!(q.remove(a, &key(0, 0)));
        q.push(a, key(4, 0));
        assert_eq!(q.counter(a), 100.0); // already above the minimum: unchanged
        assert_eq!(q.num_waiting(), 3);
    }

    #[test]
    fn priority_then_arrival_within_a_tenant() {
        let t = TenantId(0);
        let mut q = FairQueue::new(&[]);
        q.push(t, key(0, 5));
        q.push(t, key(1, -1));
        q.push(t, key(2, 5));
        q.push(t, key(3, -1));
        let order: Vec<u64> = q.waiting_of(t).map(|k| k.arrival).collect();
        assert_eq!(order, vec![1, 3, 0, 2]);
    }
}
