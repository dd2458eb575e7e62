//! Channel and bus basics used by mailboxes and topics.

use std::time::Duration;

use gorch_host::{Bus, BusError, Channel, RecvError, SendError};
use tokio_util::sync::CancellationToken;

use crate::common::run;

#[test]
fn close_drains_then_reports_closed_and_hands_values_back() {
    run(async {
        let ch: Channel<Vec<u8>> = Channel::new(2);
        ch.send(vec![1]).await.unwrap();
        ch.try_send(vec![2, 2]).unwrap();
        assert_eq!(ch.try_send(vec![3]), Err(SendError::Full(vec![3])));
        assert_eq!(ch.stats().approx_bytes, 3);
        ch.close();
        assert_eq!(ch.send(vec![4]).await, Err(SendError::Closed(vec![4])));
        assert_eq!(ch.recv().await, Ok(vec![1]));
        assert_eq!(ch.recv().await, Ok(vec![2, 2]));
        assert_eq!(ch.recv().await, Err(RecvError::Closed));
        let s = ch.stats();
        assert_eq!((s.sends, s.recvs, s.len, s.approx_bytes), (2, 2, 0, 0));
    })
}

#[test]
fn cancellation_wakes_blocked_send_and_recv() {
    run(async {
        let ch: Channel<Vec<u8>> = Channel::new(1);
        let token = CancellationToken::new();
        let (c1, c2) = (ch.clone(), token.clone());
        let recv = tokio::spawn(async move { c1.recv_cancellable(&c2).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        token.cancel();
        assert_eq!(recv.await.unwrap(), Err(RecvError::Cancelled));

        ch.send(vec![0]).await.unwrap();
        let token = CancellationToken::new();
        let (c1, c2) = (ch.clone(), token.clone());
        let send = tokio::spawn(async move { c1.send_cancellable(vec![9], &c2).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        token.cancel();
        assert_eq!(send.await.unwrap(), Err(SendError::Cancelled(vec![9])));
        let s = ch.stats();
        assert!(s.blocked_send_ns >= 15_000_000 && s.blocked_recv_ns >= 15_000_000, "{s:?}");
        assert_eq!(ch.recv_timeout(Duration::from_millis(10)).await, Ok(vec![0]));
        assert_eq!(ch.recv_timeout(Duration::from_millis(10)).await, Err(RecvError::Timeout));
    })
}

#[test]
fn bus_topics_are_created_once_and_validated() {
    let bus: Bus<Vec<u8>> = Bus::with_max_topics(2);
    assert_eq!(bus.topic("a", 4).unwrap().cap(), 4);
    assert_eq!(bus.topic("a", 8).unwrap().cap(), 4);
    assert!(matches!(bus.topic("", 4), Err(BusError::InvalidName { .. })));
    assert!(matches!(bus.topic("has space", 4), Err(BusError::InvalidName { .. })));
    assert!(matches!(bus.topic(&"x".repeat(256), 4), Err(BusError::InvalidName { .. })));
    bus.topic("b", 4).unwrap();
    assert_eq!(bus.topic("c", 4).unwrap_err(), BusError::TooManyTopics { max: 2 });
    assert!(bus.remove("a"));
    assert_eq!(bus.topics().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["b"]);
}
