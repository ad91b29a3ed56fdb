//! Body encoding of the Raft transport: postcard of openraft's own request and response
//! types, tagged by the message's `format` field so a later encoding can be introduced
//! without ambiguity.
//!
//! Responses carry `Result<T, Fatal>`: openraft's `Raft` API returns `RaftError<C>` whose
//! only possible variant is `Fatal` (the remote group stopped or its storage failed).

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `format` value of a postcard-encoded body. The only format this node speaks.
pub const FORMAT_POSTCARD: u32 = 1;

/// A body that could not be encoded or decoded. `what` names the message.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("{what}: unsupported body format {format} (this node speaks format {FORMAT_POSTCARD}, postcard)")]
    UnknownFormat { what: &'static str, format: u32 },
    #[error("{what}: body does not decode: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("{what}: does not encode: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
}

pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Bytes, CodecError> {
    postcard::to_stdvec(value).map(Bytes::from).map_err(|source| CodecError::Encode { what, source })
}

pub fn decode<T: DeserializeOwned>(what: &'static str, format: u32, body: &[u8]) -> Result<T, CodecError> {
    if format != FORMAT_POSTCARD {
        return Err(CodecError::UnknownFormat { what, format });
    }
    postcard::from_bytes(body).map_err(|source| CodecError::Decode { what, source })
}

/// Encoded size of `value` without allocating it.
pub fn encoded_len<T: Serialize>(what: &'static str, value: &T) -> Result<usize, CodecError> {
    postcard::experimental::serialized_size(value).map_err(|source| CodecError::Encode { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rejects_other_formats_naming_the_message() {
        let body = encode("x", &7u64).unwrap();
        let err = decode::<u64>("vote request", 2, &body).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("vote request") && msg.contains("format 2"), "{msg}");
        assert_eq!(decode::<u64>("vote request", FORMAT_POSTCARD, &body).unwrap(), 7);
    }

    #[test]
    fn decode_rejects_truncated_body() {
        let body = encode("x", &(1u64, String::from("hello"))).unwrap();
        let err = decode::<(u64, String)>("append request", FORMAT_POSTCARD, &body[..body.len() - 2]).unwrap_err();
        assert!(matches!(err, CodecError::Decode { what: "append request", .. }), "{err}");
    }

    #[test]
    fn encoded_len_matches_encoding() {
        let v = (3u32, vec![1u8; 300], String::from("abc"));
        assert_eq!(encoded_len("v", &v).unwrap(), encode("v", &v).unwrap().len());
    }
}
