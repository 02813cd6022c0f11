//! Why a reconcile pass failed: one variant per kind of step that failed,
//! naming the step (which call, which agent, what was read or written), and
//! the class an `error_policy` acts on. The object is the reconcile span's
//! (and the error policy logs it).

/// Why a reconciliation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what} from the apiserver")]
    Read {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("writing {what}")]
    Write {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("{call} on the agent on node {node}: {message}")]
    Agent { call: &'static str, node: String, message: String },
    #[error("no agent to {what}: {why}")]
    NoAgent { what: &'static str, why: String },
    #[error("driving the VM ({what})")]
    Power {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The object asks for something that cannot be done; a change to it is
    /// needed, not a retry.
    #[error("{0}")]
    Invalid(String),
}

/// What an error policy does about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Retry with back-off: the apiserver, an agent or the VM may answer later.
    Transient,
    /// Wait for the object to change.
    Invalid,
}

impl Error {
    /// `map_err` for a failed read of `what`.
    pub fn read(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Read { what, source }
    }

    /// `map_err` for a failed write of `what`.
    pub fn write(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Write { what, source }
    }

    /// `map_err` for a failed power step.
    pub fn power(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Power { what, source }
    }

    pub fn class(&self) -> Class {
        match self {
            Error::Invalid(_) => Class::Invalid,
            _ => Class::Transient,
        }
    }

    /// The bounded label the metrics count errors by.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::Write { .. } => "write",
            Error::Agent { .. } | Error::NoAgent { .. } => "agent",
            Error::Power { .. } => "power",
            Error::Finalizer(_) => "finalizer",
            Error::Invalid(_) => "invalid",
        }
    }

    /// What an error policy returns for this error.
    pub fn action(&self) -> kube::runtime::controller::Action {
        match self.class() {
            Class::Invalid => kube::runtime::controller::Action::await_change(),
            Class::Transient => kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5)),
        }
    }
}
