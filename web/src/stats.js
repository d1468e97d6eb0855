// Turns RTCPeerConnection.getStats() reports into the numbers the page shows: resolution, fps,
// received bitrate, RTT, packets lost, frames decoded and the decoder in use.

/** Keeps the previous sample so the bitrate is computed over the last interval. */
export class StatsSampler {
  constructor() {
    this.prev = null;
  }

  /** @param {RTCStatsReport} report */
  sample(report) {
    let inbound = null;
    let pair = null;
    let selectedPairId = null;
    const codecs = new Map();
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") inbound = s;
      else if (s.type === "transport" && s.selectedCandidatePairId) selectedPairId = s.selectedCandidatePairId;
      else if (s.type === "codec") codecs.set(s.id, s);
    });
    if (selectedPairId) pair = report.get(selectedPairId);
    if (!pair) {
      report.forEach((s) => {
        if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s;
      });
    }
    const out = {
      width: inbound?.frameWidth ?? null,
      height: inbound?.frameHeight ?? null,
      fps: inbound?.framesPerSecond ?? null,
      framesDecoded: inbound?.framesDecoded ?? null,
      packetsLost: inbound?.packetsLost ?? null,
      decoder: inbound?.decoderImplementation ?? null,
      codec: inbound?.codecId ? codecs.get(inbound.codecId)?.mimeType ?? null : null,
      rttMs: pair?.currentRoundTripTime != null ? pair.currentRoundTripTime * 1000 : null,
      bitrate: null,
    };
    if (inbound) {
      const now = { t: inbound.timestamp, bytes: inbound.bytesReceived, id: inbound.id };
      if (this.prev && this.prev.id === now.id && now.t > this.prev.t) {
        out.bitrate = ((now.bytes - this.prev.bytes) * 8 * 1000) / (now.t - this.prev.t);
      }
      this.prev = now;
    }
    return out;
  }
}

export function formatBitrate(bps) {
  if (bps == null || !Number.isFinite(bps)) return "–";
  return bps >= 1e6 ? `${(bps / 1e6).toFixed(2)} Mbit/s` : `${Math.round(bps / 1000)} kbit/s`;
}
