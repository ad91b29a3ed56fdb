//! Generated code for Habar's gRPC APIs, and nothing else.

/// The public API: `habar.v1.Broker` and `habar.v1.Cluster`.
pub mod v1 {
    tonic::include_proto!("habar.v1");
}

/// The internal Raft transport between nodes.
pub mod raft {
    tonic::include_proto!("habar.raft.v1");
}

/// Forwarding of client calls to a shard leader (internal).
pub mod forward {
    tonic::include_proto!("habar.forward.v1");
}

/// The encoded `FileDescriptorSet` of every file above, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("habar_descriptor");
