//! Streamed snapshot transfer: the leader sends its snapshot file in chunks over the
//! client-streaming `InstallSnapshot` RPC; the follower writes them to disk and then
//! installs the whole snapshot with `Raft::install_full_snapshot`.
//!
//! Neither side holds more than a couple of chunks in memory. The first chunk carries a
//! [`SnapshotHeader`] (the leader's vote, the snapshot meta and the data length); the last
//! one is flagged `last` and carries the CRC32C of all data bytes. The receiver checks
//! group, length and CRC before it finishes the file, and the store's writer validates
//! the file's own format and CRCs in `finish`.
//!
//! Timeouts (sender): every chunk must be taken by the transport within the RPC's soft TTL
//! (openraft's `install_snapshot_timeout`), so a stalled receiver is detected; once all
//! chunks are out, the receiver gets [`install_allowance`] to install (it rewrites a whole
//! shard) before the transfer fails as a timeout. HTTP/2 keep-alive detects a dead peer
//! meanwhile. Receiver: a stream that sends nothing for [`RECEIVE_IDLE_TIMEOUT`] is
//! abandoned.

use std::io;
use std::io::Read;
use std::pin::pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use habar_proto::raft::raft_transport_client::RaftTransportClient;
use habar_proto::raft::RaftMessage;
use habar_proto::raft::SnapshotChunk;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NodeId;
use habar_raft_store::types::Snapshot;
use habar_raft_store::types::SnapshotMeta;
use habar_raft_store::types::TypeConfig;
use habar_raft_store::types::Vote;
use openraft::error::ErrorSource;
use openraft::error::Fatal;
use openraft::error::NetworkError;
use openraft::error::ReplicationClosed;
use openraft::error::StreamingError;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::raft::SnapshotResponse;
use openraft::StorageError;
use serde::Deserialize;
use serde::Serialize;
use tonic::transport::Channel;

use super::client::status_to_rpc_error;
use super::codec;
use super::fault::Verdict;
use super::metric;
use super::RpcKind;
use super::FORMAT_POSTCARD;
use super::MAX_MESSAGE_BYTES;
use super::MAX_SNAPSHOT_CHUNK_BYTES;
use super::SNAPSHOT_CHUNK_BYTES;

/// A receiver abandons a snapshot stream that sends nothing for this long.
pub const RECEIVE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Smallest chunk the sender uses, whatever openraft's `snapshot_max_chunk_size` says.
const MIN_CHUNK_BYTES: usize = 64 * 1024;

/// Snapshot data the sender can stream: a file of known length.
///
/// Implemented for the store's `SnapshotData`; any state machine whose snapshots are
/// files can use this transport.
pub trait SnapshotFile: Send + 'static {
    /// Length of the file in bytes.
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Opens the file for reading from its start.
    fn open(&self) -> io::Result<std::fs::File>;
}

/// Receives one streamed snapshot, chunk by chunk, into a file. Methods are synchronous
/// (file I/O); the transport calls them off the async runtime.
pub trait SnapshotChunkWriter: Send + 'static {
    /// What the state machine installs (its `SnapshotData`).
    type Data: Send + 'static;

    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()>;

    /// Makes the received file durable and validates it. Dropping a writer without
    /// `finish` abandons the partial file.
    fn finish(self) -> io::Result<Self::Data>;
}

/// Creates a [`SnapshotChunkWriter`] per received snapshot (the node's state store).
pub trait SnapshotSink: Send + Sync + 'static {
    type Writer: SnapshotChunkWriter;

    fn snapshot_writer(&self, group: GroupId) -> io::Result<Self::Writer>;
}

// The node's real storage: `habar_raft_store`'s snapshot files.

impl SnapshotFile for habar_raft_store::SnapshotData {
    fn len(&self) -> u64 {
        habar_raft_store::SnapshotData::len(self)
    }

    fn open(&self) -> io::Result<std::fs::File> {
        habar_raft_store::SnapshotData::open(self)
    }
}

impl SnapshotChunkWriter for habar_raft_store::SnapshotWriter {
    type Data = habar_raft_store::SnapshotData;

    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        habar_raft_store::SnapshotWriter::write_chunk(self, data)
    }

    fn finish(self) -> io::Result<Self::Data> {
        habar_raft_store::SnapshotWriter::finish(self).map_err(io::Error::from)
    }
}

impl SnapshotSink for habar_raft_store::StateStore {
    type Writer = habar_raft_store::SnapshotWriter;

    fn snapshot_writer(&self, group: GroupId) -> io::Result<Self::Writer> {
        habar_raft_store::StateStore::snapshot_writer(self, group).map_err(io::Error::from)
    }
}

/// What the first chunk's `header` carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// The sending leader's vote; the receiver's Raft checks it at install.
    pub vote: Vote,
    pub meta: SnapshotMeta,
    /// Number of data bytes the stream carries.
    pub len: u64,
}

/// How long a receiver may take to install a snapshot of `len` bytes once it has all of
/// it: 30 s plus 1 s per 8 MiB.
pub fn install_allowance(len: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_secs(len / (8 * 1024 * 1024))
}

fn network_err(e: &(impl std::error::Error + 'static)) -> StreamingError<TypeConfig> {
    StreamingError::Network(NetworkError::new(e))
}

/// Reading state of the outgoing stream (moved in and out of `spawn_blocking`).
struct Reader {
    file: Option<std::fs::File>,
    len: u64,
    sent: u64,
    crc: u32,
    header: Option<Bytes>,
    chunk_bytes: usize,
    group: GroupId,
    target: NodeId,
    done: bool,
}

impl Reader {
    /// Reads the next chunk. Checks the file is exactly `len` bytes long.
    fn next_chunk(&mut self) -> io::Result<SnapshotChunk> {
        let file = self.file.as_mut().ok_or_else(|| io::Error::other("snapshot file is not open"))?;
        let remaining = self.len - self.sent;
        let want = usize::try_from(remaining.min(self.chunk_bytes as u64)).unwrap_or(self.chunk_bytes);
        let mut buf = vec![0u8; want];
        file.read_exact(&mut buf).map_err(|e| {
            io::Error::new(e.kind(), format!("reading snapshot at offset {} of {}: {e}", self.sent, self.len))
        })?;
        self.sent += want as u64;
        self.crc = crc32c::crc32c_append(self.crc, &buf);
        let last = self.sent == self.len;
        if last {
            let mut probe = [0u8; 1];
            if file.read(&mut probe)? != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("snapshot file is longer than its announced {} bytes", self.len),
                ));
            }
            self.done = true;
        }
        let header = self.header.take();
        Ok(SnapshotChunk {
            group_id: self.group,
            format: FORMAT_POSTCARD,
            target_node: header.as_ref().map(|_| self.target),
            header: header.unwrap_or_default(),
            data: Bytes::from(buf),
            last,
            data_crc32c: last.then_some(self.crc),
        })
    }
}

/// The chunk stream tonic pulls from. Reads happen as tonic asks for chunks, so at most
/// one chunk is read ahead of the transport. A read error ends the stream early (the
/// receiver then refuses it) and is kept in `error` for the sender to report.
fn chunk_stream(
    reader: Reader,
    pulled: Arc<AtomicU64>,
    error: Arc<Mutex<Option<io::Error>>>,
) -> impl Stream<Item = SnapshotChunk> + Send + 'static {
    futures::stream::unfold(Some(reader), move |state| {
        let pulled = pulled.clone();
        let error = error.clone();
        async move {
            let mut reader = state?;
            if reader.done {
                return None;
            }
            let res = tokio::task::spawn_blocking(move || {
                let r = reader.next_chunk();
                (reader, r)
            })
            .await;
            match res {
                Ok((reader, Ok(chunk))) => {
                    pulled.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(metric::SNAPSHOT_BYTES_SENT).increment(chunk.data.len() as u64);
                    Some((chunk, Some(reader)))
                }
                Ok((_, Err(e))) => {
                    *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    None
                }
                Err(join) => {
                    *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(io::Error::other(join));
                    None
                }
            }
        }
    })
}

/// Everything `send` needs about the link.
pub(crate) struct SendCtx {
    pub channel: Channel,
    pub group: GroupId,
    pub local: NodeId,
    pub target: NodeId,
    pub verdict: Option<Verdict>,
}

/// Streams `snapshot` to `ctx.target` and returns its answer. See the module docs for the
/// timeouts.
pub(crate) async fn send<SD: SnapshotFile>(
    ctx: SendCtx,
    vote: Vote,
    snapshot: Snapshot<SD>,
    cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
    option: RPCOption,
) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
    let Snapshot { meta, snapshot: data } = snapshot;
    let len = data.len();
    let signature = meta.signature();
    let timeout = |after: Duration| {
        StreamingError::Timeout(Timeout {
            action: RpcKind::InstallSnapshot.openraft_type(),
            id: ctx.local,
            target: ctx.target,
            timeout: after,
        })
    };
    let idle = option.soft_ttl();

    match ctx.verdict {
        None | Some(Verdict::Deliver { .. }) | Some(Verdict::DropResponse { .. }) => {}
        Some(Verdict::Cut) => {
            return Err(StreamingError::Unreachable(Unreachable::from_string("link cut by the fault injector")));
        }
        Some(Verdict::DropRequest) => {
            tokio::time::sleep(idle).await;
            return Err(timeout(idle));
        }
    }
    if let Some(Verdict::Deliver { delay } | Verdict::DropResponse { delay }) = ctx.verdict {
        tokio::time::sleep(delay).await;
    }

    let header = codec::encode("snapshot header", &SnapshotHeader { vote, meta, len }).map_err(|e| network_err(&e))?;
    let file = tokio::task::spawn_blocking(move || data.open()).await.map_err(|e| network_err(&e))?.map_err(|e| {
        StreamingError::StorageError(StorageError::read_snapshot(Some(signature.clone()), ErrorSource::from_error(&e)))
    })?;

    let chunk_bytes =
        option.snapshot_chunk_size().unwrap_or(SNAPSHOT_CHUNK_BYTES).clamp(MIN_CHUNK_BYTES, MAX_SNAPSHOT_CHUNK_BYTES);
    let n_chunks = len.div_ceil(chunk_bytes as u64).max(1);
    let pulled = Arc::new(AtomicU64::new(0));
    let read_error = Arc::new(Mutex::new(None));
    let reader = Reader {
        file: Some(file),
        len,
        sent: 0,
        crc: 0,
        header: Some(header),
        chunk_bytes,
        group: ctx.group,
        target: ctx.target,
        done: false,
    };
    let stream = chunk_stream(reader, pulled.clone(), read_error.clone());

    let mut client = RaftTransportClient::new(ctx.channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut call = pin!(client.install_snapshot(tonic::Request::new(stream)));
    let mut cancel = pin!(cancel);

    // Progress watch: fail if no chunk moved within `idle`, or if the install takes
    // longer than its allowance once every chunk is out.
    let mut seen = 0u64;
    let mut install_deadline = None;
    let mut check_at = tokio::time::Instant::now() + idle;
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            closed = &mut cancel => return Err(StreamingError::Closed(closed)),
            _ = tokio::time::sleep_until(check_at) => {
                let now = tokio::time::Instant::now();
                let p = pulled.load(Ordering::Relaxed);
                if p >= n_chunks {
                    let deadline = *install_deadline.get_or_insert(now + install_allowance(len).max(idle));
                    if now >= deadline {
                        return Err(timeout(install_allowance(len)));
                    }
                    check_at = deadline;
                } else if p == seen {
                    tracing::warn!(group = ctx.group, target = ctx.target, chunks = p, of = n_chunks, "snapshot stream stalled");
                    return Err(timeout(idle));
                } else {
                    seen = p;
                    check_at = now + idle;
                }
            }
        }
    };

    if let Some(e) = read_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(StreamingError::StorageError(StorageError::read_snapshot(
            Some(signature),
            ErrorSource::from_error(&e),
        )));
    }
    let reply = match result {
        Ok(r) => r.into_inner(),
        Err(status) => {
            return Err(match status_to_rpc_error(RpcKind::InstallSnapshot, ctx.local, ctx.target, idle, status) {
                openraft::error::RPCError::Timeout(t) => StreamingError::Timeout(t),
                openraft::error::RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                openraft::error::RPCError::Network(n) => StreamingError::Network(n),
                openraft::error::RPCError::RemoteError(r) => match r.source {},
            })
        }
    };
    if let Some(Verdict::DropResponse { .. }) = ctx.verdict {
        // The snapshot was installed but the answer is "lost".
        return Err(timeout(idle));
    }
    let res: Result<SnapshotResponse<TypeConfig>, Fatal<TypeConfig>> =
        codec::decode("install snapshot response", reply.format, &reply.body)
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
    res.map_err(|fatal| {
        StreamingError::Unreachable(Unreachable::new(&openraft::error::RemoteError::<TypeConfig, _>::new(
            ctx.target, fatal,
        )))
    })
}

/// Limits of the receiving side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReceiveLimits {
    pub max_snapshot_bytes: u64,
}

/// A received stream, checked and written to disk, ready to install.
pub(crate) struct Received<D> {
    pub group: GroupId,
    pub header: SnapshotHeader,
    pub data: D,
}

async fn next_chunk(stream: &mut tonic::Streaming<SnapshotChunk>) -> Result<Option<SnapshotChunk>, tonic::Status> {
    match tokio::time::timeout(RECEIVE_IDLE_TIMEOUT, stream.message()).await {
        Ok(r) => r,
        Err(_) => {
            Err(tonic::Status::deadline_exceeded(format!("snapshot stream sent nothing for {RECEIVE_IDLE_TIMEOUT:?}")))
        }
    }
}

/// Reads the first chunk: group, header and target. The caller resolves the group.
pub(crate) async fn receive_first(
    stream: &mut tonic::Streaming<SnapshotChunk>,
) -> Result<(SnapshotChunk, SnapshotHeader), tonic::Status> {
    let first = next_chunk(stream).await?.ok_or_else(|| tonic::Status::invalid_argument("snapshot stream is empty"))?;
    if first.header.is_empty() {
        return Err(tonic::Status::invalid_argument("first snapshot chunk has no header"));
    }
    let header: SnapshotHeader = codec::decode("snapshot header", first.format, &first.header)
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    Ok((first, header))
}

/// Receives the rest of a stream whose first chunk is `first`, writing the data through a
/// writer from `sink`.
pub(crate) async fn receive_rest<S: SnapshotSink>(
    sink: &Arc<S>,
    limits: ReceiveLimits,
    first: SnapshotChunk,
    header: SnapshotHeader,
    stream: &mut tonic::Streaming<SnapshotChunk>,
) -> Result<Received<<S::Writer as SnapshotChunkWriter>::Data>, tonic::Status> {
    let group = first.group_id;
    if header.len > limits.max_snapshot_bytes {
        return Err(tonic::Status::resource_exhausted(format!(
            "snapshot of group {group} is {} bytes, over this node's limit of {} bytes",
            header.len, limits.max_snapshot_bytes
        )));
    }
    let sink = sink.clone();
    let mut writer = tokio::task::spawn_blocking(move || sink.snapshot_writer(group))
        .await
        .map_err(|e| tonic::Status::internal(format!("snapshot writer task: {e}")))?
        .map_err(|e| tonic::Status::internal(format!("cannot create a snapshot writer for group {group}: {e}")))?;

    let mut received = 0u64;
    let mut crc = 0u32;
    let mut index = 0u64;
    let mut chunk = first;
    loop {
        if chunk.group_id != group {
            return Err(tonic::Status::invalid_argument(format!(
                "snapshot chunk {index} is for group {}, the stream is for group {group}",
                chunk.group_id
            )));
        }
        if chunk.format != FORMAT_POSTCARD {
            return Err(tonic::Status::invalid_argument(format!(
                "snapshot chunk {index}: unsupported format {}",
                chunk.format
            )));
        }
        if index > 0 && !chunk.header.is_empty() {
            return Err(tonic::Status::invalid_argument(format!("snapshot chunk {index} carries a second header")));
        }
        let n = chunk.data.len();
        if n > MAX_SNAPSHOT_CHUNK_BYTES {
            return Err(tonic::Status::invalid_argument(format!(
                "snapshot chunk {index} has {n} bytes, over the limit of {MAX_SNAPSHOT_CHUNK_BYTES}"
            )));
        }
        if received + n as u64 > header.len {
            return Err(tonic::Status::invalid_argument(format!(
                "snapshot stream carries more than its announced {} bytes",
                header.len
            )));
        }
        received += n as u64;
        crc = crc32c::crc32c_append(crc, &chunk.data);
        metrics::counter!(metric::SNAPSHOT_BYTES_RECEIVED).increment(n as u64);
        if n > 0 {
            let data = chunk.data;
            writer = tokio::task::spawn_blocking(move || writer.write_chunk(&data).map(|()| writer))
                .await
                .map_err(|e| tonic::Status::internal(format!("snapshot write task: {e}")))?
                .map_err(|e| {
                    tonic::Status::internal(format!(
                        "writing snapshot of group {group} at offset {}: {e}",
                        received - n as u64
                    ))
                })?;
        }
        if chunk.last {
            if received != header.len {
                return Err(tonic::Status::invalid_argument(format!(
                    "snapshot stream ended at {received} bytes, {} announced",
                    header.len
                )));
            }
            match chunk.data_crc32c {
                Some(c) if c == crc => {}
                Some(c) => {
                    return Err(tonic::Status::data_loss(format!(
                        "snapshot data CRC32C mismatch: stream says {c:#010x}, received bytes give {crc:#010x}"
                    )))
                }
                None => return Err(tonic::Status::invalid_argument("last snapshot chunk has no data_crc32c")),
            }
            break;
        }
        index += 1;
        chunk = next_chunk(stream).await?.ok_or_else(|| {
            tonic::Status::invalid_argument(format!(
                "snapshot stream ended after {received} of {} bytes without its last chunk",
                header.len
            ))
        })?;
    }
    let data = tokio::task::spawn_blocking(move || writer.finish())
        .await
        .map_err(|e| tonic::Status::internal(format!("snapshot finish task: {e}")))?
        .map_err(|e| tonic::Status::data_loss(format!("received snapshot of group {group} is not valid: {e}")))?;
    Ok(Received { group, header, data })
}

/// Encodes the answer to an install.
pub(crate) fn reply(
    group: GroupId,
    res: &Result<SnapshotResponse<TypeConfig>, Fatal<TypeConfig>>,
) -> Result<RaftMessage, tonic::Status> {
    let body = codec::encode("install snapshot response", res).map_err(|e| tonic::Status::internal(e.to_string()))?;
    Ok(RaftMessage { group_id: group, format: FORMAT_POSTCARD, body, target_node: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_chunks_a_file_and_checks_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let content: Vec<u8> = (0..(2 * MIN_CHUNK_BYTES + 5)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let mk = |len| Reader {
            file: Some(std::fs::File::open(&path).unwrap()),
            len,
            sent: 0,
            crc: 0,
            header: Some(Bytes::from_static(b"h")),
            chunk_bytes: MIN_CHUNK_BYTES,
            group: 3,
            target: 9,
            done: false,
        };
        let mut r = mk(content.len() as u64);
        let mut out = Vec::new();
        let mut chunks = Vec::new();
        while !r.done {
            let c = r.next_chunk().unwrap();
            out.extend_from_slice(&c.data);
            chunks.push(c);
        }
        assert_eq!(out, content);
        assert_eq!(chunks.len(), 3);
        assert_eq!(&chunks[0].header[..], b"h");
        assert_eq!(chunks[0].target_node, Some(9));
        assert!(chunks[1].header.is_empty() && chunks[1].target_node.is_none());
        assert!(chunks[2].last && !chunks[1].last);
        assert_eq!(chunks[2].data_crc32c, Some(crc32c::crc32c(&content)));

        // Announced shorter than the file: refused at the end.
        let mut r = mk(content.len() as u64 - 1);
        let err = loop {
            match r.next_chunk() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("longer"), "{err}");
        // Announced longer than the file: refused with the offset.
        let mut r = mk(content.len() as u64 + 10);
        let err = loop {
            match r.next_chunk() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("offset"), "{err}");
    }
}
