//! (in progress)
pub struct NodeConfig;
