package nbd

// Wire constants of the NBD protocol (NetworkBlockDevice proto.md).
const (
	magicInit        = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt         = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply    = 0x3e889045565a9
	magicRequest     = 0x25609513
	magicSimple      = 0x67446698
	magicStructured  = 0x668e33ef
	handshakeFixed   = 1 << 0
	handshakeNoZeros = 1 << 1

	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10

	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrBit      = 1 << 31
	repErrUnsup    = repErrBit | 1
	repErrPolicy   = repErrBit | 2
	repErrInvalid  = repErrBit | 3
	repErrUnknown  = repErrBit | 6
	repErrTooBig   = repErrBit | 9

	infoExport    = 0
	infoName      = 1
	infoBlockSize = 3

	flagHasFlags     = 1 << 0
	flagReadOnly     = 1 << 1
	flagSendFlush    = 1 << 2
	flagSendFUA      = 1 << 3
	flagSendTrim     = 1 << 5
	flagSendZeroes   = 1 << 6
	flagSendDF       = 1 << 7
	flagMultiConn    = 1 << 8
	flagSendCache    = 1 << 10
	flagSendFastZero = 1 << 11

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4

	replyFlagDone        = 1 << 0
	replyTypeNone        = 0
	replyTypeOffsetData  = 1
	replyTypeBlockStatus = 5
	replyTypeError       = 1<<15 | 1

	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108

	// baseAllocationID is the id we hand out for the base:allocation context.
	baseAllocationID = 1
	baseAllocation   = "base:allocation"
)

// Bounds on what a client sends during the handshake.
const (
	maxNameLen       = 4096     // the spec's limit on any string
	maxOptionLen     = 64 << 10 // larger options are skipped unread and refused with ERR_TOO_BIG
	maxSkippedOption = 1 << 20  // larger still: the client is dropped
	maxEchoedName    = 64       // bytes of a client's name quoted back in an error
)
