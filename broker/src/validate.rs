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

/// The limits a request is checked against (see [`Limits::from_config`]).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_ciphertext_bytes: usize,
    /// Always [`MAX_CONVERSATION_ID_BYTES`]: part of the API, not a setting.
    pub max_conversation_id_bytes: usize,
    pub max_envelopes_per_request: usize,
    pub max_sender_bytes: usize,
    pub read_default_limit: u32,
    pub read_max_limit: u32,
}

impl Limits {
    pub fn from_config(cfg: &NodeConfig) -> Self {
        Self {
            max_ciphertext_bytes: cfg.max_ciphertext_bytes,
            max_conversation_id_bytes: MAX_CONVERSATION_ID_BYTES,
            max_envelopes_per_request: cfg.max_envelopes_per_request,
            max_sender_bytes: cfg.max_sender_bytes,
            read_default_limit: cfg.read_default_limit,
            read_max_limit: cfg.read_max_limit,
        }
    }
}

fn conversation_id(field: &dyn std::fmt::Display, id: &str, limits: &Limits) -> Result<(), Status> {
    if id.is_empty() || id.len() > limits.max_conversation_id_bytes {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; it must be 1..={} bytes",
            id.len(),
            limits.max_conversation_id_bytes
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
        conversation_id(&format_args!("envelopes[{i}].conversation_id"), &e.conversation_id, limits)?;
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

/// Readers' ids (devices, users) are 1..=256 bytes, like conversation ids.
pub const MAX_READER_ID_BYTES: usize = 256;
/// Cursors returned by one `GetCursors` with limit 0, and at most.
pub const CURSORS_DEFAULT_LIMIT: u32 = 1000;
pub const CURSORS_MAX_LIMIT: u32 = 10_000;

/// Validates a `Read`; returns whether it reads backwards and the effective limit
/// (0 → default, above max → max).
pub fn read_request(req: &pb::ReadRequest, limits: &Limits) -> Result<(bool, u32), Status> {
    conversation_id(&"conversation_id", &req.conversation_id, limits)?;
    let backward = match pb::Direction::try_from(req.direction) {
        Ok(pb::Direction::Forward) => false,
        Ok(pb::Direction::Backward) => true,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "direction is {}; it must be FORWARD (0) or BACKWARD (1)",
                req.direction
            )))
        }
    };
    if backward && req.from_seq != 0 {
        return Err(Status::invalid_argument(
            "from_seq is set on a BACKWARD read; backward reads page with before_seq (0 = from the newest)",
        ));
    }
    if !backward && req.before_seq != 0 {
        return Err(Status::invalid_argument("before_seq is set on a FORWARD read; forward reads page with from_seq"));
    }
    let limit = match req.limit {
        0 => limits.read_default_limit,
        l => l.min(limits.read_max_limit),
    };
    Ok((backward, limit))
}

fn reader_id(field: &str, id: &str, allow_empty: bool) -> Result<(), Status> {
    if (!allow_empty && id.is_empty()) || id.len() > MAX_READER_ID_BYTES {
        let min = if allow_empty { 0 } else { 1 };
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; it must be {min}..={MAX_READER_ID_BYTES} bytes",
            id.len()
        )));
    }
    Ok(())
}

pub fn commit_cursor_request(req: &pb::CommitCursorRequest, limits: &Limits) -> Result<(), Status> {
    conversation_id(&"conversation_id", &req.conversation_id, limits)?;
    reader_id("reader_id", &req.reader_id, false)
}

/// Validates a `GetCursors`; returns the effective limit.
pub fn get_cursors_request(req: &pb::GetCursorsRequest, limits: &Limits) -> Result<u32, Status> {
    conversation_id(&"conversation_id", &req.conversation_id, limits)?;
    reader_id("reader_id", &req.reader_id, true)?;
    reader_id("after_reader_id", &req.after_reader_id, true)?;
    Ok(match req.limit {
        0 => CURSORS_DEFAULT_LIMIT,
        l => l.min(CURSORS_MAX_LIMIT),
    })
}

pub fn delete_conversation_request(req: &pb::DeleteConversationRequest, limits: &Limits) -> Result<(), Status> {
    conversation_id(&"conversation_id", &req.conversation_id, limits)
}

pub fn set_retention_request(req: &pb::SetRetentionRequest, limits: &Limits) -> Result<(), Status> {
    conversation_id(&"conversation_id", &req.conversation_id, limits)
}

/// Validates one `SubscribeControl` of a stream that has `current` conversations;
/// `max` is the per-stream bound.
pub fn subscribe_control(
    ctrl: &pb::SubscribeControl,
    current: usize,
    max: usize,
    limits: &Limits,
) -> Result<(), Status> {
    for (i, c) in ctrl.add.iter().enumerate() {
        conversation_id(&format_args!("add[{i}].conversation_id"), &c.conversation_id, limits)?;
    }
    for (i, c) in ctrl.drop.iter().enumerate() {
        conversation_id(&format_args!("drop[{i}]"), c, limits)?;
    }
    if current + ctrl.add.len() > max {
        return Err(Status::invalid_argument(format!(
            "the stream would have {} conversations; the limit is {max} (subscribe_max_conversations)",
            current + ctrl.add.len()
        )));
    }
    Ok(())
}

/// Validates a `Subscribe` (it has no limit: the stream is paced by the client's flow control).
pub fn subscribe_request(req: &pb::SubscribeRequest, limits: &Limits) -> Result<(), Status> {
    conversation_id(&"conversation_id", &req.conversation_id, limits)
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

    /// The message of the INVALID_ARGUMENT a request fails with.
    fn err(envs: Vec<pb::Envelope>) -> String {
        let s = publish_request(pb::PublishRequest { envelopes: envs, ephemeral: false }, &limits()).unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        s.message().to_string()
    }

    fn assert_names(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "expected `{p}` in `{msg}`");
        }
    }

    #[test]
    fn an_empty_publish_is_rejected() {
        assert_names(&err(vec![]), &["envelopes is empty"]);
    }

    #[test]
    fn too_many_envelopes_are_rejected_naming_the_count_and_limit() {
        assert_names(
            &err((0..1001).map(|_| env()).collect()),
            &["envelopes has 1001", "1000", "max_envelopes_per_request"],
        );
    }

    #[test]
    fn empty_or_oversize_conversation_ids_are_rejected_with_their_index() {
        assert_names(
            &err(vec![pb::Envelope { conversation_id: String::new(), ..env() }]),
            &["envelopes[0].conversation_id is 0 bytes", "1..=256"],
        );
        assert_names(
            &err(vec![env(), pb::Envelope { conversation_id: "x".repeat(257), ..env() }]),
            &["envelopes[1].conversation_id is 257 bytes", "1..=256"],
        );
        // Bytes, not characters: 86 three-byte characters are 258 bytes.
        assert_names(&err(vec![pb::Envelope { conversation_id: "€".repeat(86), ..env() }]), &["is 258 bytes"]);
    }

    #[test]
    fn message_ids_must_be_exactly_16_bytes() {
        for len in [0, 15, 17] {
            assert_names(
                &err(vec![env(), env(), env(), pb::Envelope { message_id: vec![0u8; len].into(), ..env() }]),
                &[&format!("envelopes[3].message_id is {len} bytes"), "exactly 16"],
            );
        }
    }

    #[test]
    fn oversize_ciphertext_is_rejected_naming_the_limit() {
        assert_names(
            &err(vec![pb::Envelope { ciphertext: vec![0u8; (1 << 20) + 1].into(), ..env() }]),
            &["envelopes[0].ciphertext is 1048577 bytes", "1048576", "max_ciphertext_bytes"],
        );
    }

    #[test]
    fn oversize_sender_is_rejected_naming_the_limit() {
        assert_names(
            &err(vec![pb::Envelope { sender: "s".repeat(1025), ..env() }]),
            &["envelopes[0].sender is 1025 bytes", "1024", "max_sender_bytes"],
        );
    }

    #[test]
    fn one_bad_envelope_fails_the_whole_request_and_names_the_first_bad_one() {
        let mut envs = vec![env(); 10];
        envs[7].message_id = bytes::Bytes::new();
        envs[9].sender = "s".repeat(5000);
        assert_names(&err(envs), &["envelopes[7].message_id"]);
    }

    #[test]
    fn values_at_the_limits_pass_and_fields_are_carried_over() {
        let at_limit = pb::Envelope {
            ciphertext: vec![7u8; 1 << 20].into(),
            conversation_id: "x".repeat(256),
            sender: "s".repeat(1024),
            message_id: (0u8..16).collect::<Vec<_>>().into(),
            expires_at_ms: 42,
        };
        let ok = publish_request(
            pb::PublishRequest { envelopes: vec![at_limit.clone(); 1000], ephemeral: false },
            &limits(),
        )
        .unwrap();
        assert_eq!(ok.len(), 1000);
        let e = &ok[999];
        assert_eq!(e.conversation_id, at_limit.conversation_id);
        assert_eq!(e.message_id.as_slice(), at_limit.message_id.as_ref());
        assert_eq!(e.sender, at_limit.sender);
        assert_eq!(e.ciphertext, at_limit.ciphertext);
        assert_eq!(e.expires_at_ms, 42);
    }

    #[test]
    fn ciphertext_is_moved_not_copied() {
        let ct = bytes::Bytes::from(vec![9u8; 4096]);
        let ptr = ct.as_ptr();
        let ok = publish_request(
            pb::PublishRequest { envelopes: vec![pb::Envelope { ciphertext: ct, ..env() }], ephemeral: false },
            &limits(),
        )
        .unwrap();
        assert_eq!(ok[0].ciphertext.as_ptr(), ptr, "the same buffer");
    }

    #[test]
    fn read_limit_is_clamped_to_default_and_max() {
        let r = |limit| pb::ReadRequest { conversation_id: "c".into(), limit, ..Default::default() };
        assert_eq!(read_request(&r(0), &limits()).unwrap(), (false, 100));
        assert_eq!(read_request(&r(5), &limits()).unwrap(), (false, 5));
        assert_eq!(read_request(&r(1000), &limits()).unwrap(), (false, 1000));
        assert_eq!(read_request(&r(50_000), &limits()).unwrap(), (false, 1000));
    }

    #[test]
    fn read_direction_and_its_paging_field_must_agree() {
        let r = |direction, from_seq, before_seq| pb::ReadRequest {
            conversation_id: "c".into(),
            direction,
            from_seq,
            before_seq,
            ..Default::default()
        };
        assert_eq!(read_request(&r(1, 0, 50), &limits()).unwrap(), (true, 100));
        assert_names(read_request(&r(1, 5, 0), &limits()).unwrap_err().message(), &["from_seq", "BACKWARD"]);
        assert_names(read_request(&r(0, 0, 5), &limits()).unwrap_err().message(), &["before_seq", "FORWARD"]);
        assert_names(read_request(&r(7, 0, 0), &limits()).unwrap_err().message(), &["direction is 7"]);
    }

    #[test]
    fn cursor_requests_name_the_bad_field() {
        let c = pb::CommitCursorRequest { conversation_id: "c".into(), reader_id: String::new(), seq: 1 };
        assert_names(commit_cursor_request(&c, &limits()).unwrap_err().message(), &["reader_id is 0 bytes", "1..=256"]);
        let g = pb::GetCursorsRequest {
            conversation_id: "c".into(),
            after_reader_id: "r".repeat(300),
            ..Default::default()
        };
        assert_names(get_cursors_request(&g, &limits()).unwrap_err().message(), &["after_reader_id is 300 bytes"]);
        let g = pb::GetCursorsRequest { conversation_id: "c".into(), limit: 50_000, ..Default::default() };
        assert_eq!(get_cursors_request(&g, &limits()).unwrap(), CURSORS_MAX_LIMIT);
    }

    #[test]
    fn subscribe_control_names_the_entry_and_the_stream_bound() {
        let add = |n: usize| pb::SubscribeControl {
            add: (0..n).map(|i| pb::ConversationFrom { conversation_id: format!("c{i}"), from_seq: 0 }).collect(),
            drop: vec![],
        };
        subscribe_control(&add(10), 0, 10, &limits()).unwrap();
        assert_names(
            subscribe_control(&add(3), 9, 10, &limits()).unwrap_err().message(),
            &["12 conversations", "limit is 10", "subscribe_max_conversations"],
        );
        let mut bad = add(3);
        bad.add[2].conversation_id = String::new();
        assert_names(subscribe_control(&bad, 0, 10, &limits()).unwrap_err().message(), &["add[2].conversation_id"]);
    }

    #[test]
    fn read_and_subscribe_reject_bad_conversation_ids() {
        for id in [String::new(), "y".repeat(257)] {
            let r = read_request(&pb::ReadRequest { conversation_id: id.clone(), ..Default::default() }, &limits())
                .unwrap_err();
            assert_eq!(r.code(), tonic::Code::InvalidArgument);
            assert_names(r.message(), &["conversation_id is", "1..=256"]);
            let s =
                subscribe_request(&pb::SubscribeRequest { conversation_id: id, from_seq: 1 }, &limits()).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert_names(s.message(), &["conversation_id is", "1..=256"]);
        }
        subscribe_request(&pb::SubscribeRequest { conversation_id: "ok".into(), from_seq: 0 }, &limits()).unwrap();
    }
}
