//! The edge between the network and raft: what a peer's message must satisfy before raft
//! steps it, and what an outgoing message must carry.

use raft::prelude::*;

use crate::storage::RaftStorage;

/// raftexample's `processMessages`: a MsgSnapshot carries the ConfState of the moment the
/// snapshot was taken, which may be stale if membership changed since; the receiver would
/// then restore an outdated configuration. Send the current one.
pub fn process_messages(msgs: &mut [Message], cs: &ConfState) {
    for m in msgs {
        if m.get_msg_type() == MessageType::MsgSnapshot {
            m.mut_snapshot().mut_metadata().set_conf_state(cs.clone());
        }
    }
}

/// What raft-rs trusts in a peer's message and would panic on (or corrupt its log with) if it
/// were wrong. A well-behaved peer never sends such a message; a confused or hostile one must
/// not take the node down. `m` may be repaired in place.
pub fn check_peer_message(
    raft: &raft::Raft<RaftStorage>,
    m: &mut Message,
) -> std::result::Result<(), &'static str> {
    if m.to != raft.id {
        return Err("addressed to another node");
    }
    if m.from == raft.id || m.from == raft::INVALID_ID {
        return Err("claims to come from this node or from no node");
    }
    let log = &raft.raft_log;
    match m.get_msg_type() {
        MessageType::MsgHeartbeat if m.commit > log.last_index() => {
            // A leader sends at most what this node acknowledged. Keep the heartbeat (it
            // still says who leads), not its commit index.
            m.commit = log.committed;
        }
        MessageType::MsgReadIndex | MessageType::MsgReadIndexResp if m.entries.len() != 1 => {
            return Err("a read index message without exactly one context");
        }
        MessageType::MsgAppend => {
            let mut term = m.log_term;
            for (i, e) in m.entries.iter().enumerate() {
                if e.index != m.index + 1 + i as u64 || e.term < term || e.term > m.term {
                    return Err("an append whose entries do not follow its index and term");
                }
                term = e.term;
            }
        }
        MessageType::MsgSnapshot
            if super::snapshot::decode_data(&m.get_snapshot().data).is_err() =>
        {
            return Err("a snapshot whose payload does not decode");
        }
        // Followers forward PUTs only; membership changes go by /conf-change.
        MessageType::MsgPropose
            if m.entries.is_empty()
                || m.entries
                    .iter()
                    .any(|e| e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty()) =>
        {
            return Err("a forwarded proposal that is empty or not all PUTs");
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// raftexample's `TestProcessMessages`: an outgoing MsgSnapshot gets the node's current
    /// ConfState (AutoLeave cleared too), other messages pass unchanged and in order.
    #[test]
    fn process_messages() {
        let stale = ConfState {
            voters: vec![2, 6, 8],
            auto_leave: true,
            ..Default::default()
        };
        let mut snap_msg = Message::default();
        snap_msg.set_msg_type(MessageType::MsgSnapshot);
        snap_msg.to = 8;
        snap_msg.mut_snapshot().mut_metadata().set_conf_state(stale);
        let mut app = Message::default();
        app.set_msg_type(MessageType::MsgAppend);
        app.from = 6;
        app.to = 8;

        let current = ConfState {
            voters: vec![2, 6, 8, 10],
            ..Default::default()
        };
        let mut msgs = vec![snap_msg.clone()];
        super::process_messages(&mut msgs, &current);
        assert_eq!(
            msgs[0].get_snapshot().get_metadata().get_conf_state(),
            &current
        );

        let current = ConfState {
            voters: vec![2, 7, 8, 12],
            ..Default::default()
        };
        let mut msgs = vec![snap_msg, app.clone()];
        super::process_messages(&mut msgs, &current);
        assert_eq!(
            msgs[0].get_snapshot().get_metadata().get_conf_state(),
            &current
        );
        assert_eq!(msgs[1], app);
    }
}
