//! Who this install is: a device id and an Automerge actor id, both created on first open
//! and kept in the store. An actor id must never be used by two installs (Automerge
//! rejects the second one's changes), so neither is derived from anything a user could
//! copy to another phone.

use automerge::ActorId;
use redline_proto::DeviceId;

use crate::Error;
use crate::store::DeviceStore;

/// This install's identity.
#[derive(Clone, Debug)]
pub struct DeviceIdentity {
    /// The device id the relay knows this install by.
    pub device: DeviceId,
    /// The Automerge actor all local changes are made with.
    pub actor: ActorId,
}

const DEVICE_KEY: &str = "device_id";
const ACTOR_KEY: &str = "actor_id";

/// Loads this install's identity, creating it on first open. A device token names the
/// device id (`assigned`): the stored id follows it; the actor never changes.
pub(crate) fn load_or_create(
    store: &dyn DeviceStore,
    assigned: Option<DeviceId>,
) -> Result<DeviceIdentity, Error> {
    if let (Some(device), Some(actor)) = (store.meta(DEVICE_KEY)?, store.meta(ACTOR_KEY)?) {
        let device =
            String::from_utf8(device).map_err(|_| Error::Store("corrupt device id".into()))?;
        let mut device = DeviceId::new(device)?;
        if let Some(a) = assigned
            && a != device
        {
            store.put_meta(DEVICE_KEY, a.as_str().as_bytes())?;
            device = a;
        }
        return Ok(DeviceIdentity {
            device,
            actor: ActorId::from(actor),
        });
    }
    let device = match assigned {
        Some(d) => d,
        None => DeviceId::new(format!("dev-{:016x}", rand::random::<u64>()))?,
    };
    let actor = ActorId::random();
    // Actor first: a crash in between leaves no device id, so both are made again.
    store.put_meta(ACTOR_KEY, actor.to_bytes())?;
    store.put_meta(DEVICE_KEY, device.as_str().as_bytes())?;
    Ok(DeviceIdentity { device, actor })
}
