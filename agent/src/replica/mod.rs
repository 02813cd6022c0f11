//! The replica side: where received segments land, are applied with undo, and
//! become recovery points.

pub mod direct;
pub mod disk;
pub mod names;
pub mod ranges;
pub mod retention;

pub use disk::{Incoming, Point, PointKind, ReplicaDisk, ReplicaError, ReplicaState};
