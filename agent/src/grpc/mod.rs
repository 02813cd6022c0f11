//! The agent's two gRPC services, thin: each translates its wire to
//! [`crate::agent::Agent`] calls and back, and nothing else.
//! `control`: controller → agent (only the controller's identity);
//! `replication`: agent ↔ agent (authorised primaries, never the controller).

pub mod control;
pub mod replication;
mod resync;
