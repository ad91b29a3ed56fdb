//! Conversions between the public protobuf types and the store's types.

use bytes::Bytes;
use habar_proto::v1 as pb;
use habar_raft_store::sm::ReadPage;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::types::StoredEnvelope;
use habar_raft_store::types::MESSAGE_ID_LEN;

use crate::error::BrokerError;

pub fn envelope_to_pb(e: NewEnvelope) -> pb::Envelope {
    pb::Envelope {
        conversation_id: e.conversation_id,
        message_id: Bytes::copy_from_slice(&e.message_id),
        sender: e.sender,
        ciphertext: e.ciphertext,
        expires_at_ms: e.expires_at_ms,
    }
}

pub fn stored_to_pb(s: StoredEnvelope) -> pb::StoredEnvelope {
    pb::StoredEnvelope {
        envelope: Some(envelope_to_pb(s.envelope)),
        seq: s.seq,
        committed_at_ms: s.committed_at_ms,
        ephemeral: false,
    }
}

/// For envelopes that come back from another node: checked, never trusted blindly.
pub fn stored_from_pb(s: pb::StoredEnvelope) -> Result<StoredEnvelope, BrokerError> {
    let e = s.envelope.ok_or_else(|| BrokerError::Internal("forwarded envelope is missing".into()))?;
    let message_id: [u8; MESSAGE_ID_LEN] = e
        .message_id
        .as_ref()
        .try_into()
        .map_err(|_| BrokerError::Internal(format!("forwarded message_id has {} bytes", e.message_id.len())))?;
    Ok(StoredEnvelope {
        envelope: NewEnvelope {
            conversation_id: e.conversation_id,
            message_id,
            sender: e.sender,
            ciphertext: e.ciphertext,
            expires_at_ms: e.expires_at_ms,
        },
        seq: s.seq,
        committed_at_ms: s.committed_at_ms,
    })
}

pub fn page_to_pb(p: ReadPage) -> pb::ReadResponse {
    pb::ReadResponse {
        envelopes: p.envelopes.into_iter().map(stored_to_pb).collect(),
        last_seq: p.last_seq,
        end: p.end,
        first_seq: p.first_seq,
        removed: p.removed.into_iter().map(|(from, to)| pb::SeqRange { from, to }).collect(),
    }
}
