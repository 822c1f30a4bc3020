//! wip facade
pub use postbox_core::*;
#[cfg(feature = "testkit")]
pub use postbox_testkit as testkit;
