//! tandem-operator: rolls a `TandemPool` of nodes to a target version a
//! few nodes at a time, through each node's tandem-agent: staged in
//! parallel, then cordoned, drained (PodDisruptionBudgets respected),
//! finalized (reboot) and health-gated, halting by itself after too many
//! failures.
//!
//! - [`crd`]: the `TandemPool` resource and the per-node record.
//! - [`decide`]: the rollout's decisions (pure).
//! - [`controller`]: reads the API, carries out the plan, leader election,
//!   events and metrics.

pub mod controller;
pub mod crd;
pub mod decide;
