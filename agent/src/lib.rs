//! tandem-agent: runs on each node of a cluster and bridges tandemd
//! (D-Bus, `org.tandem.Update1`) and the node's own Node object through the
//! annotation protocol AKS plans for Azure Container Linux in-place
//! updates, so that AKS or tandem-operator can drive the node.
//!
//! - [`protocol`]: the request and status annotations (pure).
//! - [`decide`]: the next step from the annotations and tandemd (pure).
//! - [`tandemd`]: the D-Bus side: status, stage, finalize, rollback.

pub mod decide;
pub mod protocol;
pub mod tandemd;
