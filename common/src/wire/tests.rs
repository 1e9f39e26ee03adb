//! Client protocol codec tests: every frame round-trips, every truncation is refused or waited
//! for, golden bytes pin the layout, and each malformed input gets the error that names it.

use super::*;

const MAX: usize = 1 << 20;

fn b(s: &'static [u8]) -> Bytes {
    Bytes::from_static(s)
}

fn subscribe(start: Option<Position>) -> Frame {
    Frame::Subscribe(SubscribeRequest {
        protocol_version: PROTOCOL_VERSION,
        topic: "persistent://public/default/orders".into(),
        subscription: "billing".into(),
        subscription_type: SubscriptionType::Failover,
        initial_position: InitialPosition::Earliest,
        consumer_name: "consumer-1".into(),
        priority: -7,
        durable: start.is_none(),
        start,
        ack_timeout_ms: 30_000,
    })
}

/// Every variant at least once, with empty and non-ASCII strings, empty payloads and lists,
/// and the extreme values of each integer.
fn frames() -> Vec<Frame> {
    vec![
        Frame::Producer(ProducerRequest {
            protocol_version: PROTOCOL_VERSION,
            topic: "orders".into(),
            producer_name: "producer-é".into(),
        }),
        Frame::Producer(ProducerRequest {
            protocol_version: u16::MAX,
            topic: String::new(),
            producer_name: String::new(),
        }),
        Frame::ProducerReady {
            producer_name: "standalone-0-1".into(),
            topic: "persistent://public/default/orders".into(),
            max_message_bytes: 5 << 20,
        },
        Frame::Send { sequence_id: 0, num_messages: 1, payload: b(b"batch bytes") },
        Frame::Send { sequence_id: u64::MAX, num_messages: u32::MAX, payload: Bytes::new() },
        Frame::SendReceipt { sequence_id: 42, position: Position::new(3, 17) },
        Frame::SendError {
            sequence_id: 43,
            code: ErrorCode::PersistenceError,
            message: "bookie quorum unavailable".into(),
        },
        Frame::SendError { sequence_id: 44, code: ErrorCode::Unknown(999), message: String::new() },
        subscribe(None),
        subscribe(Some(Position::new(u64::MAX, 0))),
        Frame::Subscribe(SubscribeRequest {
            protocol_version: 0,
            topic: "t".into(),
            subscription: "s".into(),
            subscription_type: SubscriptionType::KeyShared,
            initial_position: InitialPosition::Latest,
            consumer_name: String::new(),
            priority: i32::MIN,
            durable: true,
            start: None,
            ack_timeout_ms: u32::MAX,
        }),
        Frame::SubscribeReady { topic: "persistent://public/default/orders".into() },
        Frame::Flow { permits: 1000 },
        Frame::Flow { permits: 0 },
        Frame::Message { position: Position::new(3, 18), redelivery_count: 0, payload: b(b"stored batch") },
        Frame::Message { position: Position::new(0, u64::MAX), redelivery_count: u32::MAX, payload: Bytes::new() },
        Frame::Ack { cumulative: false, positions: vec![Position::new(1, 2), Position::new(1, 3)] },
        Frame::Ack { cumulative: true, positions: vec![Position::new(9, 9)] },
        Frame::Ack { cumulative: false, positions: vec![] },
        Frame::Redeliver { positions: vec![Position::new(4, 5)] },
        Frame::Redeliver { positions: vec![] },
        Frame::ActiveConsumerChange { active: true },
        Frame::ActiveConsumerChange { active: false },
        Frame::Error { code: ErrorCode::ConsumerBusy, message: "exclusive subscription already has a consumer".into() },
        Frame::Error { code: ErrorCode::Unknown(0), message: "日本語".into() },
        Frame::Error { code: ErrorCode::NotOwner, message: "owned by another broker".into() },
        Frame::Lookup { topic: "orders".into() },
        Frame::Lookup { topic: String::new() },
        Frame::LookupResult {
            topic: "persistent://public/default/orders".into(),
            broker_url: "quic://10.0.0.7:6650".into(),
            http_url: "http://10.0.0.7:8080".into(),
        },
    ]
}

/// The name the codec uses for a frame in its errors, written out independently of the codec.
fn name(f: &Frame) -> &'static str {
    match f {
        Frame::Producer(_) => "Producer",
        Frame::ProducerReady { .. } => "ProducerReady",
        Frame::Send { .. } => "Send",
        Frame::SendReceipt { .. } => "SendReceipt",
        Frame::SendError { .. } => "SendError",
        Frame::Subscribe(_) => "Subscribe",
        Frame::SubscribeReady { .. } => "SubscribeReady",
        Frame::Flow { .. } => "Flow",
        Frame::Message { .. } => "Message",
        Frame::Ack { .. } => "Ack",
        Frame::Redeliver { .. } => "Redeliver",
        Frame::ActiveConsumerChange { .. } => "ActiveConsumerChange",
        Frame::Error { .. } => "Error",
        Frame::Lookup { .. } => "Lookup",
        Frame::LookupResult { .. } => "LookupResult",
    }
}

/// Bytes of the fixed fields before a frame's payload, for the two frames whose payload takes
/// the rest of the frame; `None` for frames without a payload.
fn payload_offset(f: &Frame) -> Option<usize> {
    match f {
        Frame::Send { .. } => Some(FRAME_HEADER_BYTES + 8 + 4),
        Frame::Message { .. } => Some(FRAME_HEADER_BYTES + 16 + 4),
        _ => None,
    }
}

fn encode(f: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    f.encode(&mut buf);
    buf
}

/// A whole frame: length prefix, kind and the given body.
fn raw(kind: u8, body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(1 + body.len() as u32);
    buf.put_u8(kind);
    buf.put_slice(body);
    buf
}

fn decode_raw(kind: u8, body: &[u8]) -> Result<Option<Frame>, FrameError> {
    decode(&mut raw(kind, body), MAX)
}

fn malformed(kind: &'static str, what: &'static str) -> Result<Option<Frame>, FrameError> {
    Err(FrameError::Malformed { kind, what })
}

// ---- round trips ----

#[test]
fn every_frame_round_trips_and_consumes_exactly_its_bytes() {
    for f in frames() {
        let mut buf = encode(&f);
        let len = buf.len();
        assert_eq!(&f.to_bytes()[..], &buf[..], "{f:?}: to_bytes matches encode");
        assert_eq!(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize, len - 4, "{f:?}: length prefix");
        buf.put_slice(b"next");
        assert_eq!(decode(&mut buf, MAX).expect("decode"), Some(f.clone()));
        assert_eq!(&buf[..], b"next", "{f:?}: consumed exactly the frame's {len} bytes");
        assert_eq!(decode_body(f.to_bytes().slice(4..)).expect("decode_body"), f);
    }
}

#[test]
fn encode_appends_to_what_the_buffer_holds() {
    let mut buf = BytesMut::from(&b"xyz"[..]);
    let f = Frame::Flow { permits: 5 };
    f.encode(&mut buf);
    assert_eq!(&buf[..3], b"xyz");
    assert_eq!(&buf[3..], &f.to_bytes()[..]);
}

#[test]
fn frames_back_to_back_decode_in_order() {
    let all = frames();
    let mut buf = BytesMut::new();
    for f in &all {
        f.encode(&mut buf);
    }
    // Half of another frame follows: it stays in the buffer.
    let tail = Frame::Flow { permits: 9 }.to_bytes();
    buf.put_slice(&tail[..5]);
    let mut decoded = Vec::new();
    while let Some(f) = decode(&mut buf, MAX).expect("decode") {
        decoded.push(f);
    }
    assert_eq!(decoded, all);
    assert_eq!(&buf[..], &tail[..5]);
    buf.put_slice(&tail[5..]);
    assert_eq!(decode(&mut buf, MAX).expect("decode"), Some(Frame::Flow { permits: 9 }));
    assert!(buf.is_empty());
}

#[test]
fn bytes_fed_one_at_a_time_yield_each_frame_on_its_last_byte() {
    let all = frames();
    let mut stream = BytesMut::new();
    let mut ends = Vec::new();
    for f in &all {
        f.encode(&mut stream);
        ends.push(stream.len());
    }
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    for (i, byte) in stream.iter().enumerate() {
        buf.put_u8(*byte);
        match decode(&mut buf, MAX).expect("decode") {
            Some(f) => {
                assert_eq!(ends[decoded.len()], i + 1, "{f:?} completed at byte {}", i + 1);
                assert!(buf.is_empty());
                decoded.push(f);
            }
            None => assert!(!ends.contains(&(i + 1)), "no frame after byte {}", i + 1),
        }
    }
    assert_eq!(decoded, all);
}

#[test]
fn payloads_share_the_receive_buffer() {
    for f in [
        Frame::Send { sequence_id: 1, num_messages: 1, payload: b(b"0123456789") },
        Frame::Message { position: Position::new(1, 1), redelivery_count: 0, payload: b(b"0123456789") },
    ] {
        let mut buf = encode(&f);
        let start = buf.as_ptr() as usize;
        let end = start + buf.len();
        let decoded = decode(&mut buf, MAX).expect("decode").expect("whole frame");
        let (Frame::Send { payload, .. } | Frame::Message { payload, .. }) = &decoded else {
            panic!("decoded {decoded:?}");
        };
        let at = payload.as_ptr() as usize;
        assert!(start <= at && at + payload.len() <= end, "{f:?}: payload was copied");
        assert_eq!(decoded, f);
    }
}

// ---- truncation ----

#[test]
fn every_strict_prefix_needs_more_bytes() {
    for f in frames() {
        let whole = encode(&f);
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut part, MAX), Ok(None), "{f:?} cut at {cut}");
            assert_eq!(&part[..], &whole[..cut], "{f:?} cut at {cut}: nothing consumed");
        }
    }
}

/// A body cut short is an error naming the frame, never a panic. Send and Message are the
/// exception once the cut is inside their payload: the payload takes the rest of the frame, so
/// the length prefix is what detects truncation there, and `decode_body` sees a shorter payload.
#[test]
fn every_truncated_body_is_an_error() {
    for f in frames() {
        let whole = f.to_bytes();
        let fixed_end = payload_offset(&f).unwrap_or(whole.len());
        for cut in FRAME_HEADER_BYTES..fixed_end {
            assert_eq!(
                decode_body(whole.slice(4..cut)),
                Err(FrameError::Malformed { kind: name(&f), what: "body too short" }),
                "{f:?} cut at {cut}"
            );
        }
        assert_eq!(decode_body(whole.slice(4..4)), Err(FrameError::Empty), "{f:?}: empty body");
        for cut in fixed_end..whole.len() {
            let short = decode_body(whole.slice(4..cut)).expect("a shorter payload is still a frame");
            let (Frame::Send { payload, .. } | Frame::Message { payload, .. }) = &short else {
                panic!("{f:?} cut at {cut} decoded as {short:?}");
            };
            assert_eq!(&payload[..], &whole[fixed_end..cut]);
        }
    }
}

// ---- golden bytes ----

#[test]
fn golden_producer() {
    let f = Frame::Producer(ProducerRequest { protocol_version: 1, topic: "t1".into(), producer_name: "p".into() });
    let expected: &[u8] = &[
        0, 0, 0, 10, // length of the rest
        1,  // kind: Producer
        0, 1, // protocol version
        0, 2, b't', b'1', // topic
        0, 1, b'p', // producer name
    ];
    assert_eq!(&f.to_bytes()[..], expected);
}

#[test]
fn golden_producer_ready() {
    let f = Frame::ProducerReady { producer_name: "p-1".into(), topic: "t".into(), max_message_bytes: 5 << 20 };
    let expected: &[u8] = &[
        0, 0, 0, 13, // length
        2,  // kind: ProducerReady
        0, 3, b'p', b'-', b'1', // producer name
        0, 1, b't', // topic
        0x00, 0x50, 0x00, 0x00, // max message bytes (5 MiB)
    ];
    assert_eq!(&f.to_bytes()[..], expected);
}

#[test]
fn golden_send() {
    let f = Frame::Send { sequence_id: 0x0102_0304_0506_0708, num_messages: 3, payload: b(b"abc") };
    let expected: &[u8] = &[
        0, 0, 0, 16, // length
        3,  // kind: Send
        1, 2, 3, 4, 5, 6, 7, 8, // sequence id
        0, 0, 0, 3, // number of messages
        b'a', b'b', b'c', // payload: the rest of the frame, no length of its own
    ];
    assert_eq!(&f.to_bytes()[..], expected);
}

#[test]
fn golden_send_receipt() {
    let f = Frame::SendReceipt { sequence_id: 7, position: Position::new(258, 9) };
    let expected: &[u8] = &[
        0, 0, 0, 25, // length
        4,  // kind: SendReceipt
        0, 0, 0, 0, 0, 0, 0, 7, // sequence id
        0, 0, 0, 0, 0, 0, 1, 2, // ledger id 258
        0, 0, 0, 0, 0, 0, 0, 9, // entry id
    ];
    assert_eq!(&f.to_bytes()[..], expected);
}

#[test]
fn golden_send_error() {
    let f = Frame::SendError { sequence_id: 1, code: ErrorCode::PersistenceError, message: "no".into() };
    let expected: &[u8] = &[
        0, 0, 0, 15, // length
        5,  // kind: SendError
        0, 0, 0, 0, 0, 0, 0, 1, // sequence id
        0, 7, // error code: PersistenceError
        0, 2, b'n', b'o', // message
    ];
    assert_eq!(&f.to_bytes()[..], expected);
}

#[test]
fn golden_subscribe_without_start() {
    let f = Frame::Subscribe(SubscribeRequest {
        protocol_version: 1,
        topic: "t".into(),
        subscription: "s".into(),
        subscription_type: SubscriptionType::KeyShared,
        initial_position: InitialPosition::Earliest,
        consumer_name: "c".into(),
        priority: -2,
        durable: true,
        start: None,
        ack_timeout_ms: 1000,
    });
    let expected: &[u8] = &[
        0, 0, 0, 24, // length
        6,  // kind: Subscribe
        0, 1, // protocol version
        0, 1, b't', // topic
        0, 1, b's', // subscription
        3,    // subscription type: KeyShared
        1,    // initial position: Earliest
        0, 1, b'c', // consumer name
        0xff, 0xff, 0xff, 0xfe, // priority -2 (two's complement)
        1,    // durable
        0,    // no start position
        0, 0, 0x03, 0xe8, // ack timeout 1000 ms
    ];
    assert_eq!(&f.to_bytes()[..], expected);
}

#[test]
fn golden_subscribe_with_start() {
    let f = Frame::Subscribe(SubscribeRequest {
        protocol_version: 1,
        topic: "t".into(),
        subscription: "r".into(),
        subscription_type: SubscriptionType::Exclusive,
        initial_position: InitialPosition::Latest,
        consumer_name: String::new(),
        priority: 0,
        durable: false,
        start: Some(Position::new(3, 4)),
        ack_timeout_ms: 0,
    });
    let expected: &[u8] = &[
        0, 0, 0, 39, // length
        6,  // kind: Subscribe
        0, 1, // protocol version
        0, 1, b't', // topic
        0, 1, b'r', // subscription
        0,    // subscription type: Exclusive
        0,    // initial position: Latest
        0, 0, // consumer name: empty
        0, 0, 0, 0, // priority
        0, // not durable
        1, // start position follows
        0, 0, 0, 0, 0, 0, 0, 3, // ledger id
        0, 0, 0, 0, 0, 0, 0, 4, // entry id
        0, 0, 0, 0, // no ack timeout
    ];
    assert_eq!(&f.to_bytes()[..], expected);
}

#[test]
fn golden_subscription_type_codes() {
    for (t, code) in [
        (SubscriptionType::Exclusive, 0),
        (SubscriptionType::Failover, 1),
        (SubscriptionType::Shared, 2),
        (SubscriptionType::KeyShared, 3),
    ] {
        let Frame::Subscribe(s) = subscribe(None) else { unreachable!() };
        let bytes = Frame::Subscribe(SubscribeRequest { subscription_type: t, ..s.clone() }).to_bytes();
        // length, kind, version, topic, subscription, then the type.
        let at = 4 + 1 + 2 + 2 + s.topic.len() + 2 + s.subscription.len();
        assert_eq!(bytes[at], code, "{t:?}");
    }
}

#[test]
fn golden_subscribe_ready_and_flow() {
    let expected: &[u8] = &[
        0, 0, 0, 4, // length
        7, // kind: SubscribeReady
        0, 1, b't', // topic
    ];
    assert_eq!(&Frame::SubscribeReady { topic: "t".into() }.to_bytes()[..], expected);
    let expected: &[u8] = &[
        0, 0, 0, 5, // length
        8, // kind: Flow
        0, 0, 0x03, 0xe8, // permits: 1000
    ];
    assert_eq!(&Frame::Flow { permits: 1000 }.to_bytes()[..], expected);
}

#[test]
fn golden_message() {
    let f = Frame::Message { position: Position::new(1, 2), redelivery_count: 3, payload: b(b"xy") };
    let expected: &[u8] = &[
        0, 0, 0, 23, // length
        9,  // kind: Message
        0, 0, 0, 0, 0, 0, 0, 1, // ledger id
        0, 0, 0, 0, 0, 0, 0, 2, // entry id
        0, 0, 0, 3, // redelivery count
        b'x', b'y', // payload: the rest of the frame
    ];
    assert_eq!(&f.to_bytes()[..], expected);
}

#[test]
fn golden_ack() {
    let f = Frame::Ack { cumulative: false, positions: vec![Position::new(1, 2), Position::new(1, 3)] };
    let expected: &[u8] = &[
        0, 0, 0, 38, // length
        10, // kind: Ack
        0,  // individual, not cumulative
        0, 0, 0, 2, // number of positions
        0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, // 1:2
        0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3, // 1:3
    ];
    assert_eq!(&f.to_bytes()[..], expected);
    let f = Frame::Ack { cumulative: true, positions: vec![Position::new(5, 6)] };
    let expected: &[u8] = &[
        0, 0, 0, 22, // length
        10, // kind: Ack
        1,  // cumulative
        0, 0, 0, 1, // number of positions
        0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 6, // 5:6
    ];
    assert_eq!(&f.to_bytes()[..], expected);
}

#[test]
fn golden_redeliver_and_active_consumer_change() {
    let expected: &[u8] = &[
        0, 0, 0, 5,  // length
        11, // kind: Redeliver
        0, 0, 0, 0, // no positions: everything unacknowledged
    ];
    assert_eq!(&Frame::Redeliver { positions: vec![] }.to_bytes()[..], expected);
    let expected: &[u8] = &[
        0, 0, 0, 2,  // length
        12, // kind: ActiveConsumerChange
        1,  // active
    ];
    assert_eq!(&Frame::ActiveConsumerChange { active: true }.to_bytes()[..], expected);
}

#[test]
fn golden_error() {
    let f = Frame::Error { code: ErrorCode::TopicNotFound, message: "é".into() };
    let expected: &[u8] = &[
        0, 0, 0, 7,  // length
        13, // kind: Error
        0, 3, // error code: TopicNotFound
        0, 2, 0xc3, 0xa9, // message: UTF-8 bytes, length in bytes not chars
    ];
    assert_eq!(&f.to_bytes()[..], expected);
    assert_eq!(ErrorCode::NotOwner.code(), 11);
    assert_eq!(ErrorCode::from_code(11), ErrorCode::NotOwner);
    assert!(ErrorCode::NotOwner.is_retryable());
}

#[test]
fn golden_lookup_and_result() {
    let expected: &[u8] = &[
        0, 0, 0, 4,  // length
        14, // kind: Lookup
        0, 1, b't', // topic
    ];
    assert_eq!(&Frame::Lookup { topic: "t".into() }.to_bytes()[..], expected);
    let f = Frame::LookupResult { topic: "t".into(), broker_url: "quic://b".into(), http_url: "http://h".into() };
    let expected: &[u8] = &[
        0, 0, 0, 24, // length
        15, // kind: LookupResult
        0, 1, b't', // topic
        0, 8, b'q', b'u', b'i', b'c', b':', b'/', b'/', b'b', // broker URL
        0, 8, b'h', b't', b't', b'p', b':', b'/', b'/', b'h', // HTTP URL
    ];
    assert_eq!(&f.to_bytes()[..], expected);
}

// ---- frame-level errors ----

#[test]
fn a_frame_above_the_maximum_is_refused_before_its_body_arrives() {
    let mut buf = BytesMut::from(&[0, 0, 0x10, 0x01][..]);
    assert_eq!(decode(&mut buf, 0x1000), Err(FrameError::TooLarge { len: 0x1001, max: 0x1000 }));
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
    assert_eq!(decode(&mut buf, MAX), Err(FrameError::TooLarge { len: u32::MAX as usize, max: MAX }));
    let err = FrameError::TooLarge { len: 0x1001, max: 0x1000 }.to_string();
    assert!(err.contains("4097") && err.contains("4096"), "{err}");
}

#[test]
fn the_maximum_counts_kind_and_body_and_is_inclusive() {
    let f = Frame::Send { sequence_id: 1, num_messages: 1, payload: Bytes::from(vec![7; 100]) };
    let len = f.to_bytes().len() - 4;
    assert_eq!(decode(&mut encode(&f), len), Ok(Some(f.clone())));
    assert_eq!(decode(&mut encode(&f), len - 1), Err(FrameError::TooLarge { len, max: len - 1 }));
}

#[test]
fn a_zero_length_frame_is_empty() {
    assert_eq!(decode(&mut BytesMut::from(&[0, 0, 0, 0][..]), MAX), Err(FrameError::Empty));
    assert_eq!(decode(&mut BytesMut::from(&[0, 0, 0, 0, 1, 2][..]), MAX), Err(FrameError::Empty));
    assert_eq!(decode_body(Bytes::new()), Err(FrameError::Empty));
}

#[test]
fn unknown_kinds_are_refused() {
    for kind in [0, 16, 99, 255] {
        assert_eq!(decode_raw(kind, &[]), Err(FrameError::UnknownKind(kind)));
        assert_eq!(decode_raw(kind, &[1, 2, 3]), Err(FrameError::UnknownKind(kind)));
    }
    assert_eq!(FrameError::UnknownKind(16).to_string(), "unknown frame kind 16");
}

// ---- malformed bodies ----

#[test]
fn booleans_other_than_0_and_1_are_malformed() {
    const BAD_BOOL: &str = "boolean is neither 0 nor 1";
    assert_eq!(decode_raw(12, &[2]), malformed("ActiveConsumerChange", BAD_BOOL));
    assert_eq!(decode_raw(12, &[0xff]), malformed("ActiveConsumerChange", BAD_BOOL));
    assert_eq!(decode_raw(10, &[2, 0, 0, 0, 0]), malformed("Ack", BAD_BOOL));

    // Subscribe: the durable flag, then the start-position flag, then the ack timeout.
    let mut sub = encode(&subscribe(None));
    let flags = sub.len() - 4;
    sub[flags - 2] = 2;
    assert_eq!(decode(&mut sub, MAX), malformed("Subscribe", BAD_BOOL));
    let mut sub = encode(&subscribe(None));
    sub[flags - 1] = 2;
    assert_eq!(decode(&mut sub, MAX), malformed("Subscribe", BAD_BOOL));
}

#[test]
fn unknown_subscription_type_and_initial_position_codes_are_malformed() {
    let Frame::Subscribe(s) = subscribe(None) else { unreachable!() };
    let at = 4 + 1 + 2 + 2 + s.topic.len() + 2 + s.subscription.len();
    for code in [4, 255] {
        let mut bytes = encode(&Frame::Subscribe(s.clone()));
        bytes[at] = code;
        assert_eq!(decode(&mut bytes, MAX), malformed("Subscribe", "unknown subscription type"), "type {code}");
    }
    for code in [2, 255] {
        let mut bytes = encode(&Frame::Subscribe(s.clone()));
        bytes[at + 1] = code;
        assert_eq!(decode(&mut bytes, MAX), malformed("Subscribe", "unknown initial position"), "position {code}");
    }
}

#[test]
fn strings_that_are_not_utf8_are_malformed() {
    const NOT_UTF8: &str = "string is not UTF-8";
    // Producer: version, then a topic of one invalid byte.
    assert_eq!(decode_raw(1, &[0, 1, 0, 1, 0xff, 0, 0]), malformed("Producer", NOT_UTF8));
    // Producer name: a lone continuation byte.
    assert_eq!(decode_raw(1, &[0, 1, 0, 1, b't', 0, 1, 0x80]), malformed("Producer", NOT_UTF8));
    // SubscribeReady: a two-byte sequence cut in half.
    assert_eq!(decode_raw(7, &[0, 1, 0xc3]), malformed("SubscribeReady", NOT_UTF8));
    // Error: an encoded surrogate (U+D800).
    assert_eq!(decode_raw(13, &[0, 1, 0, 3, 0xed, 0xa0, 0x80]), malformed("Error", NOT_UTF8));
    // ProducerReady, SendError: overlong encoding of '/'.
    assert_eq!(decode_raw(2, &[0, 2, 0xc0, 0xaf, 0, 0, 0, 0, 0, 0]), malformed("ProducerReady", NOT_UTF8));
    let mut body = vec![0; 8];
    body.extend_from_slice(&[0, 1, 0, 2, 0xc0, 0xaf]);
    assert_eq!(decode_raw(5, &body), malformed("SendError", NOT_UTF8));
}

#[test]
fn trailing_bytes_are_malformed() {
    for f in frames() {
        let mut bytes = encode(&f);
        bytes.put_u8(0);
        let len = bytes.len() as u32 - 4;
        bytes[..4].copy_from_slice(&len.to_be_bytes());
        let got = decode(&mut bytes, MAX);
        if payload_offset(&f).is_some() {
            // A payload takes the rest of the frame: the extra byte is payload, not trailing.
            let Ok(Some(Frame::Send { payload, .. } | Frame::Message { payload, .. })) = got else {
                panic!("{f:?} plus one byte decoded as {got:?}");
            };
            assert_eq!(payload.last(), Some(&0));
        } else {
            assert_eq!(got, malformed(name(&f), "trailing bytes"), "{f:?}");
        }
    }
}

#[test]
fn position_lists_above_the_limit_are_malformed() {
    let over = (MAX_POSITIONS_PER_FRAME as u32 + 1).to_be_bytes();
    let mut ack = vec![0];
    ack.extend_from_slice(&over);
    assert_eq!(decode_raw(10, &ack), malformed("Ack", "too many positions"));
    assert_eq!(decode_raw(11, &over), malformed("Redeliver", "too many positions"));
    // A count the body cannot hold is refused without allocating for it.
    assert_eq!(decode_raw(11, &u32::MAX.to_be_bytes()), malformed("Redeliver", "too many positions"));
    assert_eq!(decode_raw(11, &[0, 0, 0, 2, 0, 0]), malformed("Redeliver", "body too short"));
}

#[test]
fn position_lists_at_the_limit_round_trip() {
    let positions: Vec<Position> = (0..MAX_POSITIONS_PER_FRAME as u64).map(|i| Position::new(i / 7, i)).collect();
    let f = Frame::Redeliver { positions };
    let mut bytes = encode(&f);
    assert_eq!(bytes.len(), 4 + 1 + 4 + 16 * MAX_POSITIONS_PER_FRAME);
    assert_eq!(decode(&mut bytes, 2 * MAX), Ok(Some(f)));
}

/// Documented on `encode`: longer lists are cut to the limit, longer strings to 65,535 bytes
/// at a character boundary, so what is sent always decodes.
#[test]
fn encode_cuts_oversized_lists_and_strings_to_what_decodes() {
    let positions: Vec<Position> = (0..MAX_POSITIONS_PER_FRAME as u64 + 3).map(|i| Position::new(1, i)).collect();
    let f = Frame::Ack { cumulative: false, positions: positions.clone() };
    let Ok(Some(Frame::Ack { positions: got, .. })) = decode(&mut encode(&f), 2 * MAX) else {
        panic!("oversized ack does not decode");
    };
    assert_eq!(got, positions[..MAX_POSITIONS_PER_FRAME]);

    let ascii = "a".repeat(70_000);
    let Ok(Some(Frame::SubscribeReady { topic })) = decode(&mut encode(&Frame::SubscribeReady { topic: ascii }), MAX)
    else {
        panic!("oversized string does not decode");
    };
    assert_eq!(topic.len(), u16::MAX as usize);

    // 2-byte characters: 65,535 would split one, so the string ends at 65,534 bytes.
    let wide = "é".repeat(40_000);
    let f = Frame::Error { code: ErrorCode::Internal, message: wide.clone() };
    let Ok(Some(Frame::Error { message, .. })) = decode(&mut encode(&f), MAX) else {
        panic!("oversized UTF-8 string does not decode");
    };
    assert_eq!(message.len(), 65_534);
    assert!(wide.starts_with(&message));
}

/// Arbitrary bytes and single-byte corruptions of valid frames: the decoder returns a frame,
/// `None` or an error, and every frame it returns re-encodes to the bytes it came from.
#[test]
fn corrupted_frames_never_panic_and_decoded_frames_re_encode_exactly() {
    let seed: u64 = 0x5eed_c0de_1234_5678;
    let mut state = seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let valid: Vec<BytesMut> = frames().iter().map(encode).collect();
    for round in 0..20_000 {
        let mut input = if round % 4 == 0 {
            let n = (next() % 64) as usize;
            let mut r = BytesMut::new();
            r.put_u32(n as u32 + 1); // a plausible length so bodies are reached
            (0..=n).for_each(|_| r.put_u8(next() as u8));
            r
        } else {
            let mut v = valid[(next() % valid.len() as u64) as usize].clone();
            for _ in 0..1 + next() % 3 {
                let at = 4 + (next() as usize % (v.len() - 4));
                v[at] = next() as u8;
            }
            v
        };
        let original = input.clone();
        let mut offset = 0;
        while let Ok(Some(f)) = decode(&mut input, MAX) {
            let consumed = original.len() - input.len();
            assert_eq!(&f.to_bytes()[..], &original[offset..consumed], "seed {seed:#x} round {round}: {f:?}");
            offset = consumed;
        }
    }
}

// ---- error codes ----

#[test]
fn error_codes_have_fixed_wire_values_and_round_trip() {
    let codes = [
        (ErrorCode::BadRequest, 1),
        (ErrorCode::InvalidTopicName, 2),
        (ErrorCode::TopicNotFound, 3),
        (ErrorCode::MessageTooLarge, 4),
        (ErrorCode::ConsumerBusy, 5),
        (ErrorCode::ServiceUnavailable, 6),
        (ErrorCode::PersistenceError, 7),
        (ErrorCode::ShuttingDown, 8),
        (ErrorCode::Internal, 9),
        (ErrorCode::ProducerBusy, 10),
        (ErrorCode::NotOwner, 11),
        (ErrorCode::Unknown(999), 999),
        (ErrorCode::Unknown(0), 0),
        (ErrorCode::Unknown(u16::MAX), u16::MAX),
    ];
    for (code, value) in codes {
        assert_eq!(code.code(), value, "{code:?}");
        assert_eq!(ErrorCode::from_code(value), code, "{value}");
        let f = Frame::Error { code, message: code.code().to_string() };
        assert_eq!(decode(&mut encode(&f), MAX), Ok(Some(f)));
        let f = Frame::SendError { sequence_id: 5, code, message: String::new() };
        assert_eq!(decode(&mut encode(&f), MAX), Ok(Some(f)));
    }
    assert_eq!(ErrorCode::from_code(12), ErrorCode::Unknown(12), "the first unassigned code");
}

#[test]
fn only_transient_failures_and_moved_topics_are_retryable() {
    let retryable =
        [ErrorCode::ServiceUnavailable, ErrorCode::PersistenceError, ErrorCode::ShuttingDown, ErrorCode::NotOwner];
    for value in 0..=20 {
        let code = ErrorCode::from_code(value);
        assert_eq!(code.is_retryable(), retryable.contains(&code), "{code:?}");
    }
    assert!(!ErrorCode::Unknown(999).is_retryable());
}

// ---- names on command lines and in configs ----

#[test]
fn subscription_types_parse_from_their_names() {
    for (s, t) in [
        ("exclusive", SubscriptionType::Exclusive),
        ("Exclusive", SubscriptionType::Exclusive),
        ("failover", SubscriptionType::Failover),
        ("SHARED", SubscriptionType::Shared),
        ("key_shared", SubscriptionType::KeyShared),
        ("key-shared", SubscriptionType::KeyShared),
        ("Key_Shared", SubscriptionType::KeyShared),
        ("keyshared", SubscriptionType::KeyShared),
        ("KeyShared", SubscriptionType::KeyShared),
    ] {
        assert_eq!(s.parse::<SubscriptionType>(), Ok(t), "{s}");
    }
    for t in
        [SubscriptionType::Exclusive, SubscriptionType::Failover, SubscriptionType::Shared, SubscriptionType::KeyShared]
    {
        assert_eq!(t.to_string(), t.as_str());
        assert_eq!(t.as_str().parse::<SubscriptionType>(), Ok(t));
    }
    for bad in ["", "round_robin", "exclusive ", "key shared", "sharedd"] {
        let err = bad.parse::<SubscriptionType>().expect_err(bad);
        assert!(err.contains(&format!("{bad:?}")), "{err}");
        assert!(err.contains("key_shared"), "lists the accepted names: {err}");
    }
}

#[test]
fn initial_positions_parse_from_their_names() {
    assert_eq!(InitialPosition::default(), InitialPosition::Latest);
    for (s, p) in [
        ("latest", InitialPosition::Latest),
        ("Latest", InitialPosition::Latest),
        ("EARLIEST", InitialPosition::Earliest),
        ("earliest", InitialPosition::Earliest),
    ] {
        assert_eq!(s.parse::<InitialPosition>(), Ok(p), "{s}");
    }
    for bad in ["", "oldest", "first", " latest"] {
        let err = bad.parse::<InitialPosition>().expect_err(bad);
        assert!(err.contains(&format!("{bad:?}")), "{err}");
        assert!(err.contains("earliest or latest"), "{err}");
    }
}

#[test]
fn split_headers_plus_payload_equal_the_whole_frame() {
    let payload = Bytes::from_static(b"some batch bytes");
    let position = Position::new(7, 9);
    let mut split = BytesMut::new();
    encode_message_header(position, 3, payload.len(), &mut split);
    split.extend_from_slice(&payload);
    let whole = Frame::Message { position, redelivery_count: 3, payload: payload.clone() }.to_bytes();
    assert_eq!(&split[..], &whole[..]);
    let mut split = BytesMut::new();
    encode_send_header(42, 5, payload.len(), &mut split);
    split.extend_from_slice(&payload);
    let whole = Frame::Send { sequence_id: 42, num_messages: 5, payload }.to_bytes();
    assert_eq!(&split[..], &whole[..]);
}

#[test]
fn frame_names_match_their_kinds() {
    for f in frames() {
        assert_eq!(f.name(), name(&f));
    }
}
