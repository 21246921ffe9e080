//! Content hashing, the content-addressed store, stage keys and the workspace lock.

pub mod hash;
pub mod key;
pub mod lock;
pub mod statcache;
pub mod store;

pub use hash::{Hasher, Snapshot};
pub use key::KeyParts;
pub use statcache::StatCache;
pub use store::{
    flatten_metrics, metric_columns, GcReport, OutRecord, Record, Store, VerifyReport,
};
