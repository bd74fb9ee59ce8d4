//! The `raftexample` binary: parse flags, build the logger, bind both listeners, run the node
//! until SIGINT/SIGTERM or its removal. Every startup error is one line on stderr.

use std::process::ExitCode;

use clap::Parser;
use slog::o;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use raftexample::{config, Config, Error};

fn main() -> ExitCode {
    let cfg = Config::parse();
    if let Some(config::Command::WalDump { data_dir, id }) = &cfg.command {
        let stdout = std::io::stdout();
        return match raftexample::dump::wal_dump(data_dir, *id, &mut stdout.lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e.to_string()),
        };
    }
    if let Some(config::Command::Restore {
        backup,
        id,
        cluster,
        data_dir,
    }) = &cfg.command
    {
        return restore(raftexample::restore::Request {
            backup: backup.clone(),
            id: *id,
            cluster: cluster.clone(),
            data_dir: data_dir.clone(),
        });
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail_as(cfg.log_format, &format!("cannot start the runtime: {e}")),
    };
    rt.block_on(start(cfg))
}

fn restore(req: raftexample::restore::Request) -> ExitCode {
    match raftexample::restore::restore(&req) {
        Ok(r) => {
            println!(
                "restored member {} of a new cluster (cluster id {}): {} keys at index {}, \
                 term {}, into {} and {}",
                req.id,
                raftexample::cluster_id::format(r.cluster_id),
                r.keys,
                r.index,
                r.term,
                r.wal_dir.display(),
                r.snap_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("restore: {e}")),
    }
}

/// The daemon's last line, in its log format.
fn fail_as(format: raftexample::logging::LogFormat, msg: &str) -> ExitCode {
    if format == raftexample::logging::LogFormat::Json {
        eprintln!(
            "{}",
            raftexample::logging::fatal_json(&format!("raftexample: {msg}"))
        );
        return ExitCode::FAILURE;
    }
    fail(msg)
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("raftexample: {msg}");
    ExitCode::FAILURE
}

async fn start(cfg: Config) -> ExitCode {
    if let Err(e) = cfg.validate().and_then(|_| check_data_dir(&cfg)) {
        return fail_as(cfg.log_format, &e.to_string());
    }
    let (peer, client) = match bind(&cfg).await {
        Ok(l) => l,
        Err(e) => return fail_as(cfg.log_format, &e.to_string()),
    };

    let (logger, guard) =
        raftexample::logging::stderr_logger(cfg.log_format, cfg.log_level, o!("id" => cfg.id));

    let format = cfg.log_format;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal(shutdown.clone(), logger.clone()));
    let res = raftexample::run(cfg, peer, client, logger, shutdown).await;
    // Flush the log before the last line is printed.
    drop(guard);
    match res {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail_as(format, &e.to_string()),
    }
}

async fn bind(cfg: &Config) -> Result<(TcpListener, TcpListener), Error> {
    let own = cfg.own_url()?;
    let listen = |addr: String, what: &'static str| async move {
        let sock = config::resolve(&addr)?;
        TcpListener::bind(sock).await.map_err(|e| Error::Io {
            context: format!("cannot listen on {what} address {addr}"),
            source: e,
        })
    };
    let peer = listen(own.authority.clone(), "peer").await?;
    let client = listen(cfg.client_addr()?, "client").await?;
    Ok((peer, client))
}

/// Fails early, with a one-line error, if the data directory cannot be written.
fn check_data_dir(cfg: &Config) -> Result<(), Error> {
    let dir = &cfg.data_dir;
    let err = |source| Error::DataDir {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let probe = dir.join(format!(".raftexample-{}-probe", cfg.id));
    std::fs::write(&probe, b"").map_err(err)?;
    std::fs::remove_file(&probe).map_err(err)
}

async fn signal(token: CancellationToken, logger: slog::Logger) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    slog::info!(logger, "signal received");
    token.cancel();
}

/// jemalloc (TiKV's allocator) instead of glibc's: under load glibc spent about 6% of all CPU in
/// `_int_malloc`, `unlink_chunk` and `malloc_consolidate` (mid-sized buffers made it coalesce
/// the many small chunks of the request path); with jemalloc the CPU per PUT fell 5-18% in A/B
/// runs, at the same peak RSS.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
