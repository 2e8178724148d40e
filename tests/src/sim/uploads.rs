//! Upload streams in the simulation: a phone's push past the inline limit goes up on a
//! stream of its own (the client core's `UploadSender`), the relay runs it through the
//! loopback (`UploadStream` and the same staging, flush, take-over and commit as over
//! QUIC). A stream's messages share their connection's order, delays, losses and
//! cuts; a cut or a relay crash ends the stream on both sides, and the phone's next
//! session resumes the upload where the relay's durable copy ends.

use redline_client::device_session::{UploadEnd, UploadSender};
use redline_proto::codec::{self, HEADER_LEN};
use redline_server::loopback::UploadOut;

use super::{Event, World};

impl World {
    /// Phone `i`'s session runs an upload on `conn`: a new stream, its first messages.
    pub(super) fn open_upload(&mut self, i: usize, conn: u64, sender: UploadSender) {
        let stream = self.next_stream;
        self.next_stream += 1;
        self.report.uploads += 1;
        self.uploads.insert(stream, (i, conn, sender));
        self.pump_upload(stream);
    }

    /// Sends what the phone's side of `stream` has to say.
    fn pump_upload(&mut self, stream: u64) {
        loop {
            let Some((_, conn, sender)) = self.uploads.get_mut(&stream) else {
                return;
            };
            let conn = *conn;
            let Some(msg) = sender.poll_transmit() else {
                return;
            };
            match codec::encode_frame(&msg, codec::DEFAULT_MAX_FRAME) {
                Ok(frame) => self.send_upload_to_relay(conn, stream, frame),
                Err(e) => return self.problems.push(format!("a phone could not frame: {e}")),
            }
        }
    }

    /// A frame on an upload stream, in its connection's order; it may cut the
    /// connection as any message does.
    fn send_upload_to_relay(&mut self, conn: u64, stream: u64, frame: Vec<u8>) {
        let event = Event::UploadToRelay {
            conn,
            stream,
            frame,
        };
        self.schedule_to_relay(conn, event);
    }

    fn send_upload_to_phone(&mut self, conn: u64, stream: u64, out: UploadOut) {
        self.schedule_to_phone(conn, Event::UploadToPhone { conn, stream, out });
    }

    /// The relay reads a frame on an upload stream (the first one opens it).
    pub(super) async fn relay_reads_upload(&mut self, conn: u64, stream: u64, frame: Vec<u8>) {
        let now = self.instant();
        let Some(relay) = self.relay.as_ref() else {
            return;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.relay_done {
            return;
        }
        let Some(link) = c.link.as_mut() else {
            return self.problems.push("an upload stream before hello".into());
        };
        let msg = match codec::decode_payload(&frame[HEADER_LEN..]) {
            Ok(m) => m,
            Err(e) => return self.problems.push(format!("the relay could not read: {e}")),
        };
        let mut control = Vec::new();
        let up = match c.uploads.entry(stream) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let (up, outs) = relay.open_upload(link, now).await;
                control = outs;
                match up {
                    Some(up) => e.insert(up),
                    None => return self.deliver(conn, control),
                }
            }
        };
        let (outs, more) = relay.upload(link, up, now, Some(msg)).await;
        control.extend(more);
        for out in outs {
            self.send_upload_to_phone(conn, stream, out);
        }
        self.deliver(conn, control);
        self.after_relay_step();
    }

    /// The phone reads the relay's answer on an upload stream: more pieces, or the
    /// upload's end fed to its session.
    pub(super) fn phone_reads_upload(&mut self, conn: u64, stream: u64, out: UploadOut) {
        let Some((i, on, _)) = self.uploads.get(&stream) else {
            return;
        };
        let i = *i;
        if *on != conn || self.phones[i].conn != Some(conn) {
            // The connection is gone: so is the stream (the next session resumes).
            self.uploads.remove(&stream);
            return;
        }
        let msg = match out {
            UploadOut::Message(m) | UploadOut::Finished(m) => m,
            UploadOut::Failed(why) => {
                let device = &self.phones[i].device;
                self.problems
                    .push(format!("the relay cut {device}'s upload stream: {why}"));
                self.uploads.remove(&stream);
                return self.cut_phone(i, false);
            }
        };
        let (_, _, sender) = self.uploads.get_mut(&stream).expect("looked up above");
        match sender.handle(Some(msg)) {
            Ok(None) => self.pump_upload(stream),
            Ok(Some(end)) => {
                self.uploads.remove(&stream);
                if matches!(end, UploadEnd::Acked { .. }) {
                    self.report.photos_acked += 1;
                }
                let phone = &mut self.phones[i];
                let result = match phone.session.as_mut() {
                    Some(s) => s.handle_upload_end(end, &mut phone.store),
                    None => Ok(()),
                };
                self.after_session_input(i, result);
            }
            Err(e) => {
                self.uploads.remove(&stream);
                self.after_session_input(i, Err(e));
            }
        }
    }
}
