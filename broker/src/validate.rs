//! Checks every field of a request against its limit before anything is proposed.
//! A bad field is `INVALID_ARGUMENT` naming the field (with the envelope's index) and the
//! limit; one bad envelope fails the whole request, so nothing of it is appended.

use habar_proto::v1 as pb;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::types::MESSAGE_ID_LEN;
use tonic::Status;

use crate::config::NodeConfig;

/// Conversation ids are 1..=256 bytes: fixed by the API.
pub const MAX_CONVERSATION_ID_BYTES: usize = 256;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_ciphertext_bytes: usize,
    pub max_envelopes_per_request: usize,
    pub max_sender_bytes: usize,
    pub read_default_limit: u32,
    pub read_max_limit: u32,
}

impl Limits {
    pub fn from_config(cfg: &NodeConfig) -> Self {
        Self {
            max_ciphertext_bytes: cfg.max_ciphertext_bytes,
            max_envelopes_per_request: cfg.max_envelopes_per_request,
            max_sender_bytes: cfg.max_sender_bytes,
            read_default_limit: cfg.read_default_limit,
            read_max_limit: cfg.read_max_limit,
        }
    }
}

fn conversation_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > MAX_CONVERSATION_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; it must be 1..={MAX_CONVERSATION_ID_BYTES} bytes",
            id.len()
        )));
    }
    Ok(())
}

/// Validates a `Publish` and turns it into the store's envelopes (the ciphertext buffers
/// are moved, not copied).
pub fn publish_request(req: pb::PublishRequest, limits: &Limits) -> Result<Vec<NewEnvelope>, Status> {
    let n = req.envelopes.len();
    if n == 0 {
        return Err(Status::invalid_argument("envelopes is empty; send 1 or more envelopes"));
    }
    if n > limits.max_envelopes_per_request {
        return Err(Status::invalid_argument(format!(
            "envelopes has {n} entries; the limit is {} per request (max_envelopes_per_request)",
            limits.max_envelopes_per_request
        )));
    }
    let mut out = Vec::with_capacity(n);
    for (i, e) in req.envelopes.into_iter().enumerate() {
        conversation_id(&format!("envelopes[{i}].conversation_id"), &e.conversation_id)?;
        let message_id: [u8; MESSAGE_ID_LEN] = e.message_id.as_ref().try_into().map_err(|_| {
            Status::invalid_argument(format!(
                "envelopes[{i}].message_id is {} bytes; it must be exactly {MESSAGE_ID_LEN} bytes",
                e.message_id.len()
            ))
        })?;
        if e.ciphertext.len() > limits.max_ciphertext_bytes {
            return Err(Status::invalid_argument(format!(
                "envelopes[{i}].ciphertext is {} bytes; the limit is {} bytes (max_ciphertext_bytes)",
                e.ciphertext.len(),
                limits.max_ciphertext_bytes
            )));
        }
        if e.sender.len() > limits.max_sender_bytes {
            return Err(Status::invalid_argument(format!(
                "envelopes[{i}].sender is {} bytes; the limit is {} bytes (max_sender_bytes)",
                e.sender.len(),
                limits.max_sender_bytes
            )));
        }
        out.push(NewEnvelope {
            conversation_id: e.conversation_id,
            message_id,
            sender: e.sender,
            ciphertext: e.ciphertext,
            expires_at_ms: e.expires_at_ms,
        });
    }
    Ok(out)
}

/// Validates a `Read`; returns the effective limit (0 → default, above max → max).
pub fn read_request(req: &pb::ReadRequest, limits: &Limits) -> Result<u32, Status> {
    conversation_id("conversation_id", &req.conversation_id)?;
    Ok(match req.limit {
        0 => limits.read_default_limit,
        l => l.min(limits.read_max_limit),
    })
}

pub fn subscribe_request(req: &pb::SubscribeRequest, _limits: &Limits) -> Result<(), Status> {
    conversation_id("conversation_id", &req.conversation_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::from_config(&NodeConfig::default())
    }

    fn env() -> pb::Envelope {
        pb::Envelope {
            conversation_id: "c".into(),
            message_id: vec![1u8; 16].into(),
            sender: String::new(),
            ciphertext: vec![0u8; 10].into(),
            expires_at_ms: 0,
        }
    }

    fn err(envs: Vec<pb::Envelope>) -> String {
        let s = publish_request(pb::PublishRequest { envelopes: envs }, &limits()).unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        s.message().to_string()
    }

    #[test]
    fn each_bad_field_is_named_with_its_limit() {
        assert!(err(vec![]).contains("envelopes is empty"));
        assert!(err(vec![pb::Envelope { conversation_id: String::new(), ..env() }])
            .contains("envelopes[0].conversation_id"));
        let m = err(vec![env(), pb::Envelope { conversation_id: "x".repeat(257), ..env() }]);
        assert!(m.contains("envelopes[1].conversation_id") && m.contains("1..=256"), "{m}");
        let m = err(vec![pb::Envelope { message_id: vec![0u8; 15].into(), ..env() }]);
        assert!(m.contains("envelopes[0].message_id") && m.contains("exactly 16"), "{m}");
        let m = err(vec![pb::Envelope { ciphertext: vec![0u8; (1 << 20) + 1].into(), ..env() }]);
        assert!(m.contains("envelopes[0].ciphertext") && m.contains("1048576"), "{m}");
        let m = err(vec![pb::Envelope { sender: "s".repeat(1025), ..env() }]);
        assert!(m.contains("envelopes[0].sender") && m.contains("1024"), "{m}");
        let m = err((0..1001).map(|_| env()).collect());
        assert!(m.contains("1001") && m.contains("1000"), "{m}");
    }

    #[test]
    fn good_requests_pass_and_limits_are_clamped() {
        let ok = publish_request(pb::PublishRequest { envelopes: vec![env(); 1000] }, &limits()).unwrap();
        assert_eq!(ok.len(), 1000);
        let at_limit =
            pb::Envelope { ciphertext: vec![0u8; 1 << 20].into(), conversation_id: "x".repeat(256), ..env() };
        assert!(publish_request(pb::PublishRequest { envelopes: vec![at_limit] }, &limits()).is_ok());
        let r = |limit| pb::ReadRequest { conversation_id: "c".into(), limit, ..Default::default() };
        assert_eq!(read_request(&r(0), &limits()).unwrap(), 100);
        assert_eq!(read_request(&r(5), &limits()).unwrap(), 5);
        assert_eq!(read_request(&r(50_000), &limits()).unwrap(), 1000);
    }
}
