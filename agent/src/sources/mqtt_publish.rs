//! What both MQTT sources do with one PUBLISH before its commit: the delivery mark (source name,
//! packet id, digest), the lookup that recognises a redelivery of a message already stored, the
//! decoding ([`crate::decode::mqtt`]), the pipeline, and the size limit of the encoded events
//! (over it: a dead letter). The subscriber and the listener each commit and acknowledge in
//! their own way; this module neither commits nor acknowledges.

use rumqttc::{Publish, QoS};
use runnel_common::SourceKind;
use runnel_config::MqttPayload;

use crate::buffer::{Buffer, DeliveryMark, EncodedEvent};
use crate::decode::mqtt::{PublishFormat, TimeRule, decode_publish_with_time, digest};
use crate::decode::{self, Received};
use crate::pipeline::PipelineHandle;

/// How one MQTT source takes in its publishes: where the events go, how they decode, and the
/// name its delivery marks carry (the subscriber's name, or `listener:{client_id}`).
pub(crate) struct Intake {
    pub(crate) name: String,
    pub(crate) stream: String,
    pub(crate) payload: MqttPayload,
    pub(crate) template: Option<String>,
    /// Where JSON payloads carry their event time (`time_field`, `time_unit`).
    pub(crate) time: TimeRule,
    pub(crate) buffer: Buffer,
    pub(crate) max_event_bytes: usize,
    pub(crate) pipeline: PipelineHandle,
}

/// A decoded publish waiting for its commit.
pub(crate) struct Pending {
    pub(crate) publish: Publish,
    pub(crate) events: Vec<EncodedEvent>,
    pub(crate) mark: Option<DeliveryMark>,
}

impl Intake {
    /// The parts of the source's config that decoding needs.
    fn format(&self) -> PublishFormat<'_> {
        PublishFormat {
            payload: self.payload,
            template: self.template.as_deref(),
        }
    }
}

/// Decodes a publish. A redelivery of a message already stored gets no events (it is only
/// acknowledged).
pub(crate) async fn prepare(state: &Intake, publish: Publish) -> Pending {
    let mark = (publish.qos != QoS::AtMostOnce).then(|| DeliveryMark {
        source: state.name.clone(),
        delivery_id: u32::from(publish.pkid),
        digest: digest(&publish.topic, &publish.payload),
    });
    if publish.dup
        && let Some(mark) = &mark
    {
        match state.buffer.delivered(mark.clone()).await {
            Ok(true) => {
                tracing::debug!(source = %state.name, pkid = publish.pkid, "redelivery of a stored message; acknowledging only");
                return Pending {
                    publish,
                    events: Vec::new(),
                    mark: None,
                };
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(source = %state.name, error = format!("{error:#}"), "delivery lookup failed; storing")
            }
        }
    }
    let received = Received {
        receive_time_ms: crate::now_unix_ms(),
        stream: state.stream.clone(),
        ..Received::default()
    };
    let events = decode_publish_with_time(
        &state.format(),
        &state.time,
        &publish.topic,
        &publish.payload,
        &received,
    );
    let events = state.pipeline.process(events).await;
    let mut encoded = Vec::with_capacity(events.len());
    for event in events {
        let e = match EncodedEvent::encode(&event) {
            Ok(e) if e.bytes.len() <= state.max_event_bytes => e,
            Ok(e) => {
                let reason = format!(
                    "event is {} bytes encoded, over sources.http.max_event_bytes ({})",
                    e.bytes.len(),
                    state.max_event_bytes
                );
                dead_letter_encoded(&reason, &publish.payload, &received)
            }
            Err(error) => dead_letter_encoded(
                &format!("event does not encode: {error}"),
                &publish.payload,
                &received,
            ),
        };
        encoded.push(e);
    }
    Pending {
        publish,
        events: encoded,
        mark,
    }
}

fn dead_letter_encoded(reason: &str, payload: &[u8], received: &Received) -> EncodedEvent {
    let event = decode::dead_letter(SourceKind::Mqtt, reason, payload, received);
    EncodedEvent::encode(&event).expect("a dead letter is small and always encodes")
}
