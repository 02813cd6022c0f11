//! The NBD server through which a VM's QEMU reaches its protected disks.

pub mod proto;
pub mod server;

pub use server::NbdServer;
