//! LISTEN on its own connection: other relays' commits announced by NOTIFY (the new
//! sequence number only), with a periodic re-read of the feed head as the safety net.

use super::*;

/// The connection settings of the LISTEN connection (the pool's, parsed again).
pub(super) fn config_for_listen(url: &str) -> Result<tokio_postgres::Config, Error> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Error::Config(format!("PostgreSQL URL {} is not valid: {e}", redact(url))))?;
    config.application_name("redline-relay-listen");
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    Ok(config)
}

/// Listens for the feed's announcements (other relays' flushes and this one's) and
/// moves `notify` to the highest sequence announced; reconnects after a failure (the
/// relay's periodic re-read of the feed's head covers what was missed meanwhile).
pub(super) async fn listen(
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    notify: tokio::sync::watch::Sender<u64>,
) {
    loop {
        let result = match &tls {
            Some(tls) => match config.connect(tls.clone()).await {
                Ok((client, conn)) => listen_on(client, conn, &notify).await,
                Err(e) => Err(e),
            },
            None => match config.connect(tokio_postgres::NoTls).await {
                Ok((client, conn)) => listen_on(client, conn, &notify).await,
                Err(e) => Err(e),
            },
        };
        if notify.is_closed() {
            return;
        }
        if let Err(e) = result {
            tracing::debug!("feed announcements: {e}; listening again in 500 ms");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn listen_on<S, T>(
    client: tokio_postgres::Client,
    mut conn: tokio_postgres::Connection<S, T>,
    notify: &tokio::sync::watch::Sender<u64>,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_postgres::AsyncMessage;
    let sql = format!("LISTEN {}", schema::FEED_CHANNEL);
    let listen = client.batch_execute(&sql);
    tokio::pin!(listen);
    // The LISTEN's answer arrives through the connection: drive both.
    let mut listening = false;
    loop {
        if !listening {
            tokio::select! {
                r = &mut listen => { r?; listening = true; continue; }
                m = std::future::poll_fn(|cx| conn.poll_message(cx)) => {
                    if !take(m, notify)? { return Ok(()); }
                }
            }
        } else {
            let m = std::future::poll_fn(|cx| conn.poll_message(cx)).await;
            if notify.is_closed() || !take(m, notify)? {
                return Ok(());
            }
        }
    }

    fn take(
        m: Option<Result<AsyncMessage, tokio_postgres::Error>>,
        notify: &tokio::sync::watch::Sender<u64>,
    ) -> Result<bool, tokio_postgres::Error> {
        match m {
            None => Ok(false),
            Some(Err(e)) => Err(e),
            Some(Ok(AsyncMessage::Notification(n))) => {
                if let Ok(seq) = n.payload().parse::<u64>() {
                    notify.send_if_modified(|v| {
                        let forward = seq > *v;
                        if forward {
                            *v = seq;
                        }
                        forward
                    });
                }
                Ok(true)
            }
            Some(Ok(_)) => Ok(true),
        }
    }
}
