//! The NBD server through which a VM's QEMU reaches its protected disks.

mod io;
pub mod proto;
pub mod server;
mod transmission;

pub use server::NbdServer;
