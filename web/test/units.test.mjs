// Unit tests of the viewer's pure parts (topic matching, stats sampling): `npm test` (node --test).
import assert from "node:assert/strict";
import { test } from "node:test";
import { topicMatches } from "../src/broker.js";
import { StatsSampler, formatBitrate } from "../src/stats.js";

test("MQTT topic filters match like a broker's", () => {
  assert.ok(topicMatches("rtcam/+/status", "rtcam/cam1/status"));
  assert.ok(!topicMatches("rtcam/+/status", "rtcam/cam1/state"));
  assert.ok(!topicMatches("rtcam/+/status", "rtcam/a/b/status"));
  assert.ok(topicMatches("rtcam/#", "rtcam/a/b/status"));
  assert.ok(topicMatches("rtcam/cam1/session/x/out", "rtcam/cam1/session/x/out"));
  assert.ok(!topicMatches("rtcam/cam1/session/x/out", "rtcam/cam1/session/x/out/more"));
  assert.ok(!topicMatches("rtcam/cam1/session/x/out/more", "rtcam/cam1/session/x/out"));
});

function report(entries) {
  return new Map(entries.map((e) => [e.id, e]));
}

test("stats: inbound video, the selected pair's RTT, bitrate over the interval", () => {
  const s = new StatsSampler();
  const base = [
    { id: "T", type: "transport", selectedCandidatePairId: "P" },
    { id: "P", type: "candidate-pair", currentRoundTripTime: 0.012 },
    { id: "C", type: "codec", mimeType: "video/H264" },
  ];
  const first = s.sample(
    report([...base, { id: "I", type: "inbound-rtp", kind: "video", timestamp: 1000, bytesReceived: 1000, frameWidth: 640, frameHeight: 480, framesPerSecond: 30, framesDecoded: 10, packetsLost: 0, codecId: "C" }]),
  );
  assert.equal(first.bitrate, null, "no bitrate from one sample");
  assert.equal(first.rttMs, 12);
  assert.equal(first.codec, "video/H264");
  const second = s.sample(
    report([...base, { id: "I", type: "inbound-rtp", kind: "video", timestamp: 2000, bytesReceived: 126000, framesDecoded: 40, packetsLost: 2, decoderImplementation: "FFmpeg" }]),
  );
  assert.equal(second.bitrate, 1_000_000);
  assert.equal(second.framesDecoded, 40);
  assert.equal(second.packetsLost, 2);
  assert.equal(second.decoder, "FFmpeg");
  assert.equal(formatBitrate(second.bitrate), "1.00 Mbit/s");
  assert.equal(formatBitrate(300000), "300 kbit/s");
  assert.equal(formatBitrate(null), "–");
});
