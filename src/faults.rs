//! Test-only fault injection for the peer transport, compiled only with the cargo feature
//! `fault-injection` (the test suite's build); a release build has neither this module nor
//! its hidden `--fault-file` flag, so no client can reach it.
//!
//! Integration tests write a small text file per node; a task re-reads it every 50 ms. Each
//! line is a rule for messages this node sends to one peer:
//!
//! ```text
//! drop 2          # every message to node 2 is lost (a one-way cut; cut both ways for a partition)
//! delay 3 150     # messages to node 3 leave 150 ms late
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

/// What happens to messages for one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rule {
    pub drop: bool,
    pub delay: Duration,
}

#[derive(Debug, Default)]
pub struct Faults {
    rules: RwLock<HashMap<u64, Rule>>,
}

impl Faults {
    pub fn rule(&self, to: u64) -> Rule {
        self.rules
            .read()
            .expect("fault rules lock")
            .get(&to)
            .copied()
            .unwrap_or_default()
    }

    pub fn set(&self, rules: HashMap<u64, Rule>) {
        *self.rules.write().expect("fault rules lock") = rules;
    }

    /// Parses the file format above; unknown lines are ignored.
    pub fn parse(text: &str) -> HashMap<u64, Rule> {
        let mut rules: HashMap<u64, Rule> = HashMap::new();
        for line in text.lines() {
            let words: Vec<&str> = line
                .split('#')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            match words.as_slice() {
                ["drop", to] => {
                    if let Ok(to) = to.parse() {
                        rules.entry(to).or_default().drop = true;
                    }
                }
                ["delay", to, ms] => {
                    if let (Ok(to), Ok(ms)) = (to.parse(), ms.parse()) {
                        rules.entry(to).or_default().delay = Duration::from_millis(ms);
                    }
                }
                _ => {}
            }
        }
        rules
    }

    /// Follows `path` until `stop`: a missing file means no faults.
    pub fn watch(self: Arc<Self>, path: PathBuf, stop: CancellationToken, logger: slog::Logger) {
        tokio::spawn(async move {
            let mut seen: Option<(SystemTime, u64)> = None;
            loop {
                let stamp = std::fs::metadata(&path)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
                if stamp != seen {
                    seen = stamp;
                    let rules = std::fs::read_to_string(&path)
                        .map(|t| Faults::parse(&t))
                        .unwrap_or_default();
                    slog::info!(logger, "fault rules changed"; "rules" => ?rules);
                    self.set(rules);
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rules() {
        let r = Faults::parse("drop 2\ndelay 3 150 # slow\nbogus\ndrop x\n");
        assert_eq!(
            r[&2],
            Rule {
                drop: true,
                delay: Duration::ZERO
            }
        );
        assert_eq!(
            r[&3],
            Rule {
                drop: false,
                delay: Duration::from_millis(150)
            }
        );
        assert_eq!(r.len(), 2);
    }
}
