package schemas

import "unicode/utf8"

// DeadLetter is the JSON value of a record on trackstar.dlq: which record
// could not be handled, where it came from, and why. The warehouse loader
// writes it for a record it cannot decode; the dispatcher for a conversion
// whose partner postback still failed after the last retry, adding how the
// last attempt went. Its Kafka key is the original record's key.
type DeadLetter struct {
	V         int    `json:"v"` // schema version, Version: every topic's value carries it
	Topic     string `json:"topic"`
	Partition int    `json:"partition"`
	Offset    int64  `json:"offset"`
	Key       string `json:"key"`
	// Value is the original record's value when it is valid UTF-8;
	// otherwise ValueBase64 holds it.
	Value       string `json:"value,omitempty"`
	ValueBase64 []byte `json:"value_base64,omitempty"`
	Error       string `json:"error"`

	// Set by the dispatcher only.
	ConversionID string `json:"conversion_id,omitempty"`
	AffID        uint32 `json:"aff_id,omitempty"`
	Attempts     uint32 `json:"attempts,omitempty"`
	Method       string `json:"method,omitempty"`
	URL          string `json:"url,omitempty"`
	StatusCode   uint16 `json:"status_code,omitempty"` // of the last attempt; 0 when no response came
	TS           int64  `json:"ts,omitempty"`          // Unix milliseconds it was dead-lettered
}

// SetValue stores the original record's value: in Value when it is valid
// UTF-8, else in ValueBase64, so that the dead letter is valid JSON that
// gives back the exact bytes.
func (d *DeadLetter) SetValue(v []byte) {
	if utf8.Valid(v) {
		d.Value, d.ValueBase64 = string(v), nil
	} else {
		d.Value, d.ValueBase64 = "", v
	}
}
