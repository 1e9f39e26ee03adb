//! The producer against a broker played by the test over in-memory streams.

use bytes::Bytes;
use futures::FutureExt;
use magnetar_common::batch;
use magnetar_common::ids::Position;
use magnetar_common::wire::ErrorCode;
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::transport::{FrameReader, FrameWriter};
use magnetar_common::wire::ProducerRequest;

const TOPIC: &str = "persistent://public/default/t";

struct FakeBroker {
    w: FrameWriter,
    r: FrameReader,
}

impl FakeBroker {
    async fn next(&mut self) -> Frame {
        self.r.next().await.expect("read").expect("a frame, not the end")
    }
    async fn send(&mut self, f: Frame) {
        self.w.write_frames(&[f]).await.expect("write");
    }
    /// Reads a Send frame: (sequence id, decoded messages).
    async fn next_send(&mut self) -> (u64, Vec<batch::Message>) {
        match self.next().await {
            Frame::Send { sequence_id, num_messages, payload } => {
                let (h, messages) = batch::decode(payload).expect("batch");
                assert_eq!(h.sequence_id, sequence_id);
                assert_eq!(h.producer_name, "p-1");
                assert_eq!(messages.len(), num_messages as usize);
                (sequence_id, messages)
            }
            other => panic!("expected Send, got {other:?}"),
        }
    }
    async fn receipt(&mut self, sequence_id: u64, entry_id: u64) {
        self.send(Frame::SendReceipt { sequence_id, position: Position::new(3, entry_id) }).await;
    }
}

type Streams = UnboundedReceiver<(FrameWriter, FrameReader)>;

/// Accepts a producer stream, answers ready, and returns the request.
async fn accept_request(streams: &mut Streams, max_message_bytes: u32) -> (FakeBroker, ProducerRequest) {
    let (w, r) = streams.recv().await.expect("a stream");
    let mut b = FakeBroker { w, r };
    let req = match b.next().await {
        Frame::Producer(req) => req,
        other => panic!("expected Producer, got {other:?}"),
    };
    assert_eq!(req.protocol_version, PROTOCOL_VERSION);
    b.send(Frame::ProducerReady { producer_name: "p-1".into(), topic: TOPIC.into(), max_message_bytes }).await;
    (b, req)
}

async fn accept(streams: &mut Streams, max_message_bytes: u32) -> FakeBroker {
    let (b, req) = accept_request(streams, max_message_bytes).await;
    assert_eq!(req.topic, "t");
    b
}

/// Accepts the producer attaching again: same name, the full topic name.
async fn accept_again(streams: &mut Streams) -> FakeBroker {
    let (b, req) = accept_request(streams, 1 << 20).await;
    assert_eq!((req.topic.as_str(), req.producer_name.as_str()), (TOPIC, "p-1"));
    b
}

/// A producer whose batches leave only on flush/close (or when full), its broker, and the
/// streams of later attachments.
async fn producer(
    configure: impl FnOnce(ProducerBuilder) -> ProducerBuilder,
) -> (Producer, FakeBroker, Client, Streams) {
    let (client, mut streams) = Client::in_memory(Duration::from_secs(60));
    let builder = configure(client.producer("t").batching_max_delay(Duration::from_secs(3600)));
    let (producer, broker) = tokio::join!(builder.create(), accept(&mut streams, 1 << 20));
    (producer.expect("create"), broker, client, streams)
}

#[tokio::test]
async fn send_waits_for_the_receipt() {
    let (p, mut b, _c, _s) = producer(|b| b.batching(false)).await;
    assert_eq!(p.name(), "p-1");
    assert_eq!(p.topic(), TOPIC);
    assert_eq!(p.max_message_bytes(), 1 << 20);
    let broker = async {
        let (seq, messages) = b.next_send().await;
        assert_eq!(seq, 0);
        assert_eq!(messages[0].payload, Bytes::from_static(b"hello"));
        assert_eq!(messages[0].key, Some(Bytes::from_static(b"k")));
        assert_eq!(messages[0].properties, vec![("a".to_string(), "b".to_string())]);
        b.receipt(0, 7).await;
    };
    let (id, ()) = tokio::join!(p.send(OutgoingMessage::from("hello").with_key("k").with_property("a", "b")), broker);
    assert_eq!(id.expect("send"), MessageId::new(3, 7, 0));
}

#[tokio::test]
async fn a_batch_maps_to_one_id_per_message() {
    let (p, mut b, _c, _s) = producer(|b| b).await;
    let mut receipts = Vec::new();
    for i in 0..3 {
        receipts.push(p.send_async(format!("m{i}")).await.expect("queued"));
    }
    let broker = async {
        let (seq, messages) = b.next_send().await;
        assert_eq!((seq, messages.len()), (0, 3));
        b.receipt(0, 9).await;
    };
    let (flushed, ()) = tokio::join!(p.flush(), broker);
    flushed.expect("flush");
    for (i, r) in receipts.into_iter().enumerate() {
        // Flush returned, so every outcome is known already.
        let id = r.now_or_never().expect("resolved").expect("stored");
        assert_eq!(id, MessageId::new(3, 9, i as u32));
    }
    // The next batch starts at sequence id 3.
    let r = p.send_async("m3").await.expect("queued");
    let broker = async {
        let (seq, _) = b.next_send().await;
        assert_eq!(seq, 3);
        b.receipt(3, 10).await;
    };
    let (flushed, ()) = tokio::join!(p.flush(), broker);
    flushed.expect("flush");
    assert_eq!(r.await.expect("stored"), MessageId::new(3, 10, 0));
}

#[tokio::test]
async fn a_batch_leaves_after_the_max_delay_without_a_flush() {
    let (p, mut b, _c, _s) = producer(|b| b.batching_max_delay(Duration::from_millis(1))).await;
    let r = p.send_async("x").await.expect("queued");
    let (seq, _) = b.next_send().await;
    b.receipt(seq, 1).await;
    assert_eq!(r.await.expect("stored"), MessageId::new(3, 1, 0));
}

#[tokio::test]
async fn a_fatal_send_error_fails_only_its_batch() {
    let (p, mut b, _c, _s) = producer(|b| b.batching(false)).await;
    let r0 = p.send_async("a").await.expect("queued");
    let r1 = p.send_async("b").await.expect("queued");
    b.next_send().await;
    b.next_send().await;
    b.send(Frame::SendError { sequence_id: 0, code: ErrorCode::MessageTooLarge, message: "too large".into() }).await;
    b.receipt(1, 4).await;
    let e = r0.await.expect_err("failed");
    assert_eq!(e, Error::broker(ErrorCode::MessageTooLarge, "too large"));
    assert!(!e.is_retryable());
    assert_eq!(r1.await.expect("stored"), MessageId::new(3, 4, 0));
    assert_eq!(p.reconnects(), 0);
}

#[tokio::test]
async fn a_retryable_send_error_resends_from_that_batch_on_a_new_stream() {
    let (p, mut b, _c, mut streams) = producer(|b| b.batching(false)).await;
    let receipts = [
        p.send_async("a").await.expect("queued"),
        p.send_async("b").await.expect("queued"),
        p.send_async("c").await.expect("queued"),
    ];
    for _ in 0..3 {
        b.next_send().await;
    }
    b.receipt(0, 1).await;
    b.send(Frame::SendError { sequence_id: 1, code: ErrorCode::PersistenceError, message: "no bookies".into() }).await;
    let mut b = accept_again(&mut streams).await;
    for (seq, payload) in [(1, "b"), (2, "c")] {
        let (s, m) = b.next_send().await;
        assert_eq!((s, m[0].payload.clone()), (seq, Bytes::from(payload)));
        b.receipt(seq, 10 + seq).await;
    }
    let ids: Vec<MessageId> = futures::future::try_join_all(receipts).await.expect("all stored");
    assert_eq!(ids, vec![MessageId::new(3, 1, 0), MessageId::new(3, 11, 0), MessageId::new(3, 12, 0)]);
    assert_eq!(p.reconnects(), 1);
}

/// How a test broker ends a producer stream.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// The stream ends (connection lost, broker restarted).
    Drop,
    /// An `Error` frame with this (retryable) code.
    Error(ErrorCode),
}

#[tokio::test]
async fn a_lost_stream_is_resent_in_order_with_the_same_sequence_ids() {
    for cut in [Cut::Drop, Cut::Error(ErrorCode::ShuttingDown), Cut::Error(ErrorCode::NotOwner)] {
        let (p, mut b, _c, mut streams) = producer(|b| b.batching(false)).await;
        let mut receipts: Vec<SendReceipt> = Vec::new();
        for payload in ["a", "b", "c", "d"] {
            receipts.push(p.send_async(payload).await.expect("queued"));
        }
        for _ in 0..4 {
            b.next_send().await;
        }
        // Batch 0 is confirmed; 1, 2 and 3 are in flight when the stream goes.
        b.receipt(0, 1).await;
        match cut {
            Cut::Drop => drop(b),
            Cut::Error(code) => b.send(Frame::Error { code, message: "moving".into() }).await,
        }
        // Sent while reconnecting (or just after): it goes after the resent batches.
        receipts.push(p.send_async("e").await.expect("queued while reconnecting"));
        let mut b = accept_again(&mut streams).await;
        for (seq, payload) in [(1, "b"), (2, "c"), (3, "d"), (4, "e")] {
            let (s, m) = b.next_send().await;
            assert_eq!((s, m[0].payload.clone()), (seq, Bytes::from(payload)), "{cut:?}");
        }
        for seq in 1..5 {
            b.receipt(seq, 10 + seq).await;
        }
        let ids: Vec<MessageId> = futures::future::try_join_all(receipts).await.expect("all stored");
        let entries: Vec<u64> = ids.iter().map(|id| id.position.entry_id).collect();
        assert_eq!(entries, vec![1, 11, 12, 13, 14], "{cut:?}: each receipt resolved once, by its own batch");
        assert_eq!(p.reconnects(), 1, "{cut:?}");
    }
}

#[tokio::test]
async fn flush_and_close_work_across_a_reconnection() {
    let (p, mut b, _c, mut streams) = producer(|b| b).await;
    let r0 = p.send_async("a").await.expect("queued");
    let broker = async {
        let (seq, messages) = b.next_send().await;
        assert_eq!((seq, messages.len()), (0, 1));
        drop(b);
        let mut b = accept_again(&mut streams).await;
        let (seq, _) = b.next_send().await;
        assert_eq!(seq, 0, "resent");
        b.receipt(0, 5).await;
        b
    };
    let (flushed, mut b) = tokio::join!(p.flush(), broker);
    flushed.expect("flush across the reconnection");
    assert_eq!(r0.await.expect("stored"), MessageId::new(3, 5, 0));
    assert_eq!(p.reconnects(), 1);

    let r1 = p.send_async("b").await.expect("queued");
    let broker = async {
        let (seq, _) = b.next_send().await;
        assert_eq!(seq, 1);
        drop(b);
        let mut b = accept_again(&mut streams).await;
        assert_eq!(b.next_send().await.0, 1, "resent");
        b.receipt(1, 6).await;
        assert_eq!(b.r.next().await.expect("read"), None, "finished after the receipt");
    };
    let (closed, ()) = tokio::join!(p.close(), broker);
    closed.expect("close across the reconnection");
    assert_eq!(r1.await.expect("stored"), MessageId::new(3, 6, 0));
}

#[tokio::test]
async fn a_fatal_error_frame_stops_the_producer_without_reconnecting() {
    let (p, mut b, _c, mut streams) = producer(|b| b.batching(false)).await;
    let r = p.send_async("a").await.expect("queued");
    b.next_send().await;
    b.send(Frame::Error { code: ErrorCode::BadRequest, message: "unexpected Flow frame".into() }).await;
    let e = r.await.expect_err("failed");
    assert_eq!(e, Error::broker(ErrorCode::BadRequest, "unexpected Flow frame"));
    assert_eq!(p.reconnects(), 0);
    assert!(streams.try_recv().is_err(), "no new stream");
    assert_eq!(p.close().await, Err(e));
}

#[tokio::test]
async fn pending_messages_fail_with_the_last_cause_once_reconnecting_gives_up() {
    let (client, mut streams) = Client::in_memory(Duration::from_millis(300));
    let builder = client.producer("t").batching(false);
    let (p, b) = tokio::join!(builder.create(), accept(&mut streams, 1 << 20));
    let (p, mut b) = (p.expect("create"), b);
    let r = p.send_async("a").await.expect("queued");
    b.next_send().await;
    // The broker goes away for good.
    drop((b, streams));
    let e = r.await.expect_err("gave up");
    let text = e.to_string();
    assert!(text.contains("reconnect producer persistent://public/default/t: gave up after"), "{text}");
    assert!(text.contains("no test broker there"), "{text}");
    assert_eq!(p.send("b").await.expect_err("stopped"), e);
}

#[tokio::test]
async fn an_out_of_order_receipt_is_a_protocol_error() {
    let (p, mut b, _c, _s) = producer(|b| b.batching(false)).await;
    let r0 = p.send_async("a").await.expect("queued");
    let r1 = p.send_async("b").await.expect("queued");
    b.next_send().await;
    b.next_send().await;
    b.receipt(1, 1).await;
    assert!(matches!(r0.await, Err(Error::Protocol(_))));
    assert!(matches!(r1.await, Err(Error::Protocol(_))));
}

#[tokio::test]
async fn send_async_waits_for_room_under_max_pending_messages() {
    let (p, mut b, _c, _s) = producer(|b| b.batching(false).max_pending_messages(2)).await;
    let r0 = p.send_async("a").await.expect("queued");
    let _r1 = p.send_async("b").await.expect("queued");
    assert!(p.send_async("c").now_or_never().is_none(), "no room: waits");
    b.next_send().await;
    b.receipt(0, 1).await;
    r0.await.expect("stored");
    // The receipt freed a slot before it was delivered.
    let r2 = p.send_async("c").now_or_never().expect("room").expect("queued");
    drop(r2);
}

#[tokio::test]
async fn a_message_over_the_broker_limit_is_refused_at_once() {
    let (client, mut streams) = Client::in_memory(Duration::from_secs(60));
    let (p, _b) = tokio::join!(client.producer("t").create(), accept(&mut streams, 100));
    let p = p.expect("create");
    let e = p.send_async(vec![0u8; 200]).await.expect_err("too large");
    assert!(matches!(e, Error::MessageTooLarge { max: 100, .. }), "{e:?}");
}

#[tokio::test]
async fn close_sends_the_open_batch_waits_for_receipts_and_finishes() {
    let (p, mut b, _c, _s) = producer(|b| b).await;
    let r0 = p.send_async("a").await.expect("queued");
    let r1 = p.send_async("b").await.expect("queued");
    let broker = async {
        let (seq, messages) = b.next_send().await;
        assert_eq!((seq, messages.len()), (0, 2));
        b.receipt(0, 5).await;
        assert_eq!(b.r.next().await.expect("read"), None, "the stream is finished after the receipts");
    };
    let (closed, ()) = tokio::join!(p.close(), broker);
    closed.expect("close");
    assert_eq!(r0.await.expect("stored"), MessageId::new(3, 5, 0));
    assert_eq!(r1.await.expect("stored"), MessageId::new(3, 5, 1));
}

#[tokio::test]
async fn a_dropped_producer_still_delivers_what_it_queued() {
    let (p, mut b, _c, _s) = producer(|b| b).await;
    let r = p.send_async("a").await.expect("queued");
    drop(p);
    b.next_send().await;
    b.receipt(0, 2).await;
    assert_eq!(r.await.expect("stored"), MessageId::new(3, 2, 0));
    assert_eq!(b.r.next().await.expect("read"), None);
}

#[tokio::test]
async fn create_reports_the_broker_refusal() {
    let (client, mut streams) = Client::in_memory(Duration::from_secs(60));
    let broker = async {
        let (w, r) = streams.recv().await.expect("a stream");
        let mut b = FakeBroker { w, r };
        b.next().await;
        b.send(Frame::Error { code: ErrorCode::ProducerBusy, message: "producer \"x\" is connected".into() }).await;
    };
    let (p, ()) = tokio::join!(client.producer("t").name("x").create(), broker);
    assert_eq!(p.expect_err("refused"), Error::broker(ErrorCode::ProducerBusy, "producer \"x\" is connected"));
}

#[tokio::test]
async fn bad_settings_are_refused_before_connecting() {
    let (client, _streams) = Client::in_memory(Duration::from_secs(60));
    let e = client.producer("a b").create().await.expect_err("topic");
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("invalid topic name")), "{e:?}");
    let e = client.producer("t").max_pending_messages(0).create().await.expect_err("pending");
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("max_pending_messages")), "{e:?}");
    let e = client.producer("t").batching_max_messages(0).create().await.expect_err("batch");
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("batching_max_messages")), "{e:?}");
}
