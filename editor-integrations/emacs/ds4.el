;;; ds4.el --- Completions and chat from the local ds4 daemon  -*- lexical-binding: t -*-

;; Version: 0.1.0
;; Package-Requires: ((emacs "27.1"))
;; Keywords: tools, convenience
;; SPDX-License-Identifier: MIT

;;; Commentary:

;; ds4 serves DeepSeek V4 Flash from a long-lived local daemon (`ds4d serve') over msgpack-rpc on a Unix
;; socket (docs/PROTOCOL.md).  This package speaks that protocol directly:
;;
;;   - `ds4-mode': completions as you type, shown as an overlay after point; TAB accepts, C-<right> accepts
;;     one line, C-g dismisses.  `ds4-complete' asks for one now.
;;   - `ds4-chat': a chat buffer bound to a daemon session, whose cached state makes each turn pay only for
;;     its new tokens.
;;
;; Emacs has no msgpack, so the file starts with a small codec.  Sections in order: codec, connection,
;; completion, chat.

;;; Code:

(require 'cl-lib)
(require 'seq)
(require 'subr-x)

(defgroup ds4 nil
  "Completions and chat from the local ds4 daemon."
  :group 'tools
  :prefix "ds4-")

(defcustom ds4-socket nil
  "The daemon's socket; nil resolves it as every ds4 client does.
See `ds4-socket-path'."
  :type '(choice (const :tag "Default" nil) file))

(defcustom ds4-max-tokens 64
  "The most tokens one completion may have."
  :type 'integer)

(defcustom ds4-delay 0.15
  "Seconds typing must pause in `ds4-mode' before a completion is requested."
  :type 'number)

(defcustom ds4-prefix-lines 2000
  "How many lines before point a completion request carries."
  :type 'integer)

(defcustom ds4-suffix-lines 200
  "How many lines after point a completion request carries."
  :type 'integer)

(defcustom ds4-context-buffers 3
  "How many recently edited other buffers ride along as context."
  :type 'integer)

(defcustom ds4-context-lines 80
  "Lines of each context buffer, around its last change."
  :type 'integer)

(defcustom ds4-chat-thinking "none"
  "How much the model thinks before a chat answer: \"none\", \"high\" or \"max\"."
  :type '(choice (const "none") (const "high") (const "max")))

(defcustom ds4-chat-max-tokens nil
  "The most tokens of one chat answer; nil: until the model stops."
  :type '(choice (const :tag "Unlimited" nil) integer))

(defface ds4-suggestion '((t :inherit shadow))
  "The face of a completion shown after point.")

;;;; msgpack codec
;;
;; Lisp values and msgpack types map one to one, so every value survives a round trip:
;;   nil <-> nil, t <-> true, :false <-> false, integer <-> int (any width; bignums for 64 bits),
;;   float <-> float 64 (float 32 is decoded too), string <-> str (UTF-8), (:bin . UNIBYTE-STRING) <-> bin,
;;   vector <-> array, hash table <-> map.
;; Encoded bytes are unibyte strings.  The extension types are not part of the protocol and are refused.

(defun ds4--be (n size)
  "N as SIZE big-endian bytes (two's complement when negative)."
  (let ((u (logand n (1- (ash 1 (* 8 size)))))
        bytes)
    (dotimes (_ size)
      (push (logand u #xff) bytes)
      (setq u (ash u -8)))
    (apply #'unibyte-string bytes)))

(defun ds4--head (type n size)
  "A type byte TYPE followed by N in SIZE bytes."
  (concat (unibyte-string type) (ds4--be n size)))

(defun ds4--sized (n fix fix-limit type8 type16 type32)
  "The msgpack header of a value of length N.
FIX+N below FIX-LIMIT, else TYPE8 (if any), TYPE16 or TYPE32 with N."
  (cond ((< n fix-limit) (unibyte-string (+ fix n)))
        ((and type8 (< n #x100)) (ds4--head type8 n 1))
        ((< n #x10000) (ds4--head type16 n 2))
        ((< n #x100000000) (ds4--head type32 n 4))
        (t (error "ds4: %d elements or bytes are more than msgpack can hold" n))))

(defun ds4--encode-int (v)
  (cond ((>= v 0)
         (cond ((< v #x80) (unibyte-string v))
               ((< v #x100) (ds4--head #xcc v 1))
               ((< v #x10000) (ds4--head #xcd v 2))
               ((< v #x100000000) (ds4--head #xce v 4))
               ((< v (ash 1 64)) (ds4--head #xcf v 8))
               (t (error "ds4: %d does not fit msgpack's 64 bits" v))))
        ((>= v -32) (unibyte-string (logand v #xff)))
        ((>= v -128) (ds4--head #xd0 v 1))
        ((>= v -32768) (ds4--head #xd1 v 2))
        ((>= v (- (ash 1 31))) (ds4--head #xd2 v 4))
        ((>= v (- (ash 1 63))) (ds4--head #xd3 v 8))
        (t (error "ds4: %d does not fit msgpack's 64 bits" v))))

(defun ds4--float-bits (x)
  "The IEEE 754 binary64 bit pattern of X, as an integer."
  (let ((sign (if (< (copysign 1.0 x) 0) (ash 1 63) 0))
        (a (abs x)))
    (cond ((isnan x) (logior sign #x7ff8000000000000))
          ((= a 1.0e+INF) (logior sign #x7ff0000000000000))
          ((= a 0) sign)
          (t (let* ((fe (frexp a))     ; a = m * 2^e, m in [0.5, 1)
                    (biased (+ (cdr fe) 1022)))
               (if (<= biased 0)       ; subnormal: the mantissa counts units of 2^-1074
                   (logior sign (truncate (ldexp a 1074)))
                 (logior sign (ash biased 52) (truncate (ldexp (- (* 2 (car fe)) 1) 52)))))))))

(defun ds4--bits-float (bits exp-bits mant-bits)
  "The IEEE 754 float whose bit pattern is BITS.
EXP-BITS and MANT-BITS are the widths of its exponent and mantissa."
  (let* ((mant (logand bits (1- (ash 1 mant-bits))))
         (exp (logand (ash bits (- mant-bits)) (1- (ash 1 exp-bits))))
         (bias (1- (ash 1 (1- exp-bits))))
         (v (cond ((= exp (1- (ash 1 exp-bits))) (if (= mant 0) 1.0e+INF 0.0e+NaN))
                  ((= exp 0) (ldexp (float mant) (- 1 bias mant-bits)))
                  (t (ldexp (float (+ mant (ash 1 mant-bits))) (- exp bias mant-bits))))))
    (if (= 0 (ash bits (- (+ exp-bits mant-bits)))) v (- v))))

(defun ds4-msgpack-encode (value)
  "VALUE as msgpack bytes, a unibyte string.
The codec's section comment gives the mapping of types."
  (cond ((null value) (unibyte-string #xc0))
        ((eq value :false) (unibyte-string #xc2))
        ((eq value t) (unibyte-string #xc3))
        ((integerp value) (ds4--encode-int value))
        ((floatp value) (ds4--head #xcb (ds4--float-bits value) 8))
        ((stringp value)
         (let ((bytes (encode-coding-string value 'utf-8 t)))
           (concat (ds4--sized (length bytes) #xa0 32 #xd9 #xda #xdb) bytes)))
        ((and (consp value) (eq (car value) :bin))
         (concat (ds4--sized (length (cdr value)) 0 0 #xc4 #xc5 #xc6) (cdr value)))
        ((vectorp value)
         (concat (ds4--sized (length value) #x90 16 nil #xdc #xdd)
                 (mapconcat #'ds4-msgpack-encode value "")))
        ((hash-table-p value)
         (let (parts)
           (maphash (lambda (k v) (push (concat (ds4-msgpack-encode k) (ds4-msgpack-encode v)) parts)) value)
           (apply #'concat (ds4--sized (hash-table-count value) #x80 16 nil #xde #xdf) (nreverse parts))))
        (t (error "ds4: cannot encode %S as msgpack" value))))

;; The decoder reads `ds4--in' (unibyte) from `ds4--at' and throws `ds4--incomplete' when the bytes end
;; inside a value: the caller keeps them and tries again once more have arrived.
(defvar ds4--in)
(defvar ds4--at)

(defun ds4--byte ()
  (when (>= ds4--at (length ds4--in))
    (throw 'ds4--incomplete nil))
  (prog1 (aref ds4--in ds4--at)
    (setq ds4--at (1+ ds4--at))))

(defun ds4--take (n)
  (let ((end (+ ds4--at n)))
    (when (> end (length ds4--in))
      (throw 'ds4--incomplete nil))
    (prog1 (substring ds4--in ds4--at end)
      (setq ds4--at end))))

(defun ds4--uint (size)
  (let ((v 0))
    (dotimes (_ size v)
      (setq v (logior (ash v 8) (ds4--byte))))))

(defun ds4--int (size)
  (let ((v (ds4--uint size))
        (half (ash 1 (1- (* 8 size)))))
    (if (>= v half) (- v (* 2 half)) v)))

(defun ds4--read-array (n)
  (let ((v (make-vector n nil)))
    (dotimes (i n)
      (aset v i (ds4--read)))
    v))

(defun ds4--read-map (n)
  (let ((h (make-hash-table :test 'equal :size (max n 1))))
    (dotimes (_ n h)
      (let ((k (ds4--read)))
        (puthash k (ds4--read) h)))))

(defun ds4--read ()
  (let ((b (ds4--byte)))
    (cond ((<= b #x7f) b)
          ((<= b #x8f) (ds4--read-map (- b #x80)))
          ((<= b #x9f) (ds4--read-array (- b #x90)))
          ((<= b #xbf) (decode-coding-string (ds4--take (- b #xa0)) 'utf-8))
          ((>= b #xe0) (- b #x100))
          (t (pcase b
               (#xc0 nil)
               (#xc2 :false)
               (#xc3 t)
               ((or #xc4 #xc5 #xc6) (cons :bin (ds4--take (ds4--uint (ash 1 (- b #xc4))))))
               (#xca (ds4--bits-float (ds4--uint 4) 8 23))
               (#xcb (ds4--bits-float (ds4--uint 8) 11 52))
               ((or #xcc #xcd #xce #xcf) (ds4--uint (ash 1 (- b #xcc))))
               ((or #xd0 #xd1 #xd2 #xd3) (ds4--int (ash 1 (- b #xd0))))
               ((or #xd9 #xda #xdb)
                (decode-coding-string (ds4--take (ds4--uint (ash 1 (- b #xd9)))) 'utf-8))
               ((or #xdc #xdd) (ds4--read-array (ds4--uint (ash 1 (- b #xdb)))))
               ((or #xde #xdf) (ds4--read-map (ds4--uint (ash 1 (- b #xdd)))))
               (_ (error "ds4: msgpack type #x%x is not used by the protocol" b)))))))

(defun ds4-msgpack-decode-prefix (bytes &optional start)
  "The first msgpack value in the unibyte string BYTES from START.
Returns (VALUE . END), or nil when BYTES end inside the value."
  (let ((ds4--in bytes)
        (ds4--at (or start 0)))
    (catch 'ds4--incomplete
      (let ((value (ds4--read)))
        (cons value ds4--at)))))

(defun ds4-msgpack-decode (bytes)
  "The msgpack value that is the whole of the unibyte string BYTES."
  (let ((decoded (ds4-msgpack-decode-prefix bytes)))
    (unless (and decoded (= (cdr decoded) (length bytes)))
      (error "ds4: %d bytes are not exactly one msgpack value" (length bytes)))
    (car decoded)))

(defun ds4--map (&rest pairs)
  "A msgpack map (a hash table) from PAIRS of string keys and values.
Nil values are left out: the protocol reads nil as \"not given\"."
  (let ((h (make-hash-table :test 'equal)))
    (while pairs
      (when (cadr pairs)
        (puthash (car pairs) (cadr pairs) h))
      (setq pairs (cddr pairs)))
    h))

;;;; Connection
;;
;; One connection per Emacs, opened on first use.  Requests carry their callbacks in `ds4--pending' by
;; msgid; the process filter decodes whole messages (keeping a partial one for the next chunk) and routes
;; responses and `stream' notifications to them.

(defvar ds4--process nil)
(defvar ds4--next-id 0)
(defvar ds4--pending (make-hash-table) "Msgid -> (ON-DONE . ON-EVENT).")
(defvar ds4--hello nil "What the daemon answered to `hello': version, model, backend.")

(defun ds4-socket-path ()
  "The socket, resolved as every ds4 client does (client/ds4c/protocol.py).
The first of `ds4-socket', $DS4_SOCKET, $XDG_RUNTIME_DIR/ds4/ds4.sock when
that directory exists, and /tmp/ds4-UID/ds4.sock."
  (let ((env (getenv "DS4_SOCKET"))
        (runtime (getenv "XDG_RUNTIME_DIR")))
    (cond ((and ds4-socket (not (string-empty-p ds4-socket))) ds4-socket)
          ((and env (not (string-empty-p env))) env)
          ((and runtime (not (string-empty-p runtime)) (file-directory-p runtime))
           (expand-file-name "ds4/ds4.sock" runtime))
          (t (format "/tmp/ds4-%d/ds4.sock" (user-uid))))))

(defun ds4--filter (proc bytes)
  (let ((ds4--in (concat (process-get proc 'ds4-input) bytes))
        (ds4--at 0)
        (used 0)
        messages)
    (condition-case err
        (while (catch 'ds4--incomplete
                 (push (ds4--read) messages)
                 (setq used ds4--at)))
      (error (delete-process proc)
             (message "ds4: bad msgpack from the daemon: %s" (error-message-string err))))
    (process-put proc 'ds4-input (substring ds4--in used))
    (mapc #'ds4--dispatch (nreverse messages))))

(defun ds4--dispatch (msg)
  (pcase (aref msg 0)
    (2 (let* ((event (aref (aref msg 2) 0))
              (on-event (cdr (gethash (gethash "id" event) ds4--pending))))
         (when on-event
           (funcall on-event event))))
    (1 (let ((callbacks (gethash (aref msg 1) ds4--pending)))
         (remhash (aref msg 1) ds4--pending)
         (when callbacks
           (funcall (car callbacks) (aref msg 2) (aref msg 3)))))))

(defun ds4--sentinel (proc _event)
  (unless (process-live-p proc)
    (let ((pending ds4--pending))
      (setq ds4--pending (make-hash-table))
      (maphash (lambda (_id callbacks)
                 (funcall (car callbacks) (ds4--map "code" "disconnected" "message" "the connection closed") nil))
               pending))))

(defun ds4--connection ()
  "The daemon connection, opened (and greeted) when there is none.
Signals `file-error' when no daemon listens."
  (unless (process-live-p ds4--process)
    (setq ds4--process (make-network-process
                        :name "ds4" :family 'local :service (ds4-socket-path) :coding 'binary :noquery t
                        :filter #'ds4--filter :sentinel #'ds4--sentinel))
    (ds4-request "hello" (ds4--map "protocol" "1.0" "client" "emacs")
                 (lambda (err hello)
                   (setq ds4--hello hello)
                   (when err
                     (message "ds4: %s" (gethash "message" err)))
                   (when (and hello (eq t (gethash "demo" (gethash "model" hello))))
                     (message "ds4: the daemon serves its tiny random demo model; its output is gibberish")))))
  ds4--process)

(defun ds4-request (method params &optional on-done on-event)
  "Send METHOD with PARAMS and return its msgid.
PARAMS is a hash table (see `ds4--map'), or nil for none.  ON-DONE is
called with (ERROR RESULT) when it is answered, ERROR being the daemon's
{code, message} map; ON-EVENT with each of its `stream' notifications."
  (let ((proc (ds4--connection))
        (id (setq ds4--next-id (1+ (% ds4--next-id #xffffffff)))))   ; msgids are uint32
    (puthash id (cons (or on-done #'ignore) on-event) ds4--pending)
    (process-send-string proc (ds4-msgpack-encode (vector 0 id method (if params (vector params) []))))
    id))

(defun ds4-call (method params &optional timeout)
  "Send METHOD with PARAMS and wait for its result; signal its error.
Waits at most TIMEOUT seconds (default 30)."
  (let (done err result)
    (ds4-request method params (lambda (e r) (setq done t err e result r)))
    (with-timeout ((or timeout 30) (error "ds4: %s: no answer from the daemon" method))
      (while (not done)
        (accept-process-output ds4--process 0.05)))
    (when err
      (error "ds4: %s: %s" (gethash "code" err) (gethash "message" err)))
    result))

(defun ds4-cancel (id)
  "Stop the request ID if it is still in flight.
It then answers with its result so far."
  (when (and id (gethash id ds4--pending))
    (ds4-request "cancel" (ds4--map "id" id))))

;;;; Completion
;;
;; A request and the suggestion it shows are anchored to (buffer, point, modification tick): anything that
;; moves the anchor cancels the request (explicitly, and the daemon would also supersede it with the next
;; `complete') and hides the suggestion.  The suggestion streams into an overlay's after-string as tokens
;; arrive.  While it shows, `ds4-suggestion-map' is active.

(defvar ds4-suggestion-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "TAB") #'ds4-accept)
    (define-key map (kbd "<tab>") #'ds4-accept)      ; modes that bind <tab> would otherwise win over TAB
    (define-key map (kbd "C-<right>") #'ds4-accept-line)
    (define-key map (kbd "C-g") #'ds4-dismiss)
    map)
  "Keys active while a suggestion is shown.")

(defvar-local ds4--overlay nil "The suggestion's overlay; its `ds4-text' is what accepting inserts.")
(defvar-local ds4--anchor nil "(POINT . TICK) of the suggestion or the request in flight.")
(defvar-local ds4--inflight nil "The msgid of this buffer's completion request in flight.")
(defvar-local ds4--showing nil "Non-nil while a suggestion shows: activates `ds4-suggestion-map'.")
(defvar ds4--keymaps `((ds4--showing . ,ds4-suggestion-map)))
(add-to-list 'emulation-mode-map-alists 'ds4--keymaps)

(defvar ds4--recent nil "(BUFFER . POSITION) of the last change, most recently edited buffer first.")
(defvar ds4--timer nil)
(defvar ds4--accepting nil "Non-nil while accept-line inserts: that edit must keep the rest shown.")

(defun ds4--here ()
  (cons (point) (buffer-chars-modified-tick)))

(defun ds4--show (text)
  (unless ds4--overlay
    (setq ds4--overlay (make-overlay (car ds4--anchor) (car ds4--anchor) nil nil t)))
  (let ((shown (propertize text 'face 'ds4-suggestion)))
    (unless (string-empty-p shown)
      (put-text-property 0 1 'cursor t shown))         ; the cursor stays before the suggestion
    (overlay-put ds4--overlay 'after-string shown)
    (overlay-put ds4--overlay 'ds4-text text))
  (setq ds4--showing t))

(defun ds4-suggestion ()
  "The suggestion shown at point, or nil."
  (and ds4--overlay (equal ds4--anchor (ds4--here)) (overlay-get ds4--overlay 'ds4-text)))

(defun ds4-dismiss ()
  "Hide the suggestion and cancel its request."
  (interactive)
  (when ds4--timer
    (cancel-timer ds4--timer))
  (ds4-cancel ds4--inflight)
  (when ds4--overlay
    (delete-overlay ds4--overlay))
  (setq ds4--overlay nil ds4--inflight nil ds4--anchor nil ds4--showing nil))

(defun ds4--chunk (buffer position)
  "Lines of BUFFER around POSITION as a context chunk {path, text}.
Nil when they are blank."
  (with-current-buffer buffer
    (save-excursion
      (goto-char position)
      (forward-line (- (/ ds4-context-lines 2)))
      (let ((text (buffer-substring-no-properties
                   (point) (progn (forward-line (1- ds4-context-lines)) (line-end-position)))))
        (unless (string-blank-p text)
          (ds4--map "path" (if buffer-file-name (file-relative-name buffer-file-name) (buffer-name))
                    "text" text))))))

(defun ds4--context ()
  (let (chunks)
    (dolist (edit ds4--recent)
      (let ((chunk (and (< (length chunks) ds4-context-buffers)
                        (buffer-live-p (car edit))
                        (not (eq (car edit) (current-buffer)))
                        (ds4--chunk (car edit) (cdr edit)))))
        (when chunk
          (push chunk chunks))))              ; least recently edited first: the daemon wants the most stable first
    (apply #'vector chunks)))

(defun ds4--prefix-start ()
  "Where the prefix starts: a line that is a multiple of `ds4-prefix-lines' / 4.
The start then stays put while point moves, and the daemon's prompt cache
keeps serving the prefix."
  (let* ((row (1- (line-number-at-pos)))
         (step (max 1 (/ ds4-prefix-lines 4)))
         (first (max 0 (* step (ceiling (- row ds4-prefix-lines) step)))))
    (save-excursion
      (forward-line (- first row))
      (point))))

(defun ds4-complete ()
  "Ask the daemon for a completion at point and show it as it streams in."
  (interactive)
  (ds4-dismiss)
  (let* ((buffer (current-buffer))
         (anchor (ds4--here))
         (text "")
         (params (ds4--map "prefix" (buffer-substring-no-properties (ds4--prefix-start) (point))
                           "suffix" (buffer-substring-no-properties
                                     (point) (save-excursion (forward-line ds4-suffix-lines) (line-end-position)))
                           "context" (ds4--context)
                           "max_tokens" ds4-max-tokens))
         id)
    (cl-flet ((current-p () (and (buffer-live-p buffer)
                                 (with-current-buffer buffer
                                   (and (eql ds4--inflight id) (equal (ds4--here) anchor))))))
      (setq id (ds4-request
                "complete" params
                (lambda (err result)
                  (when (current-p)
                    (with-current-buffer buffer
                      (setq ds4--inflight nil)
                      (cond (err (message "ds4: %s" (gethash "message" err)))
                            ((equal (gethash "finish_reason" result) "cancelled"))
                            ((string-empty-p (gethash "text" result)) (ds4-dismiss))
                            (t (ds4--show (gethash "text" result)))))))
                (lambda (event)
                  (when (and (equal (gethash "kind" event) "content") (current-p))
                    (setq text (concat text (gethash "text" event)))
                    (with-current-buffer buffer
                      (ds4--show text))))))
      (setq ds4--inflight id ds4--anchor anchor))))

(defun ds4-accept ()
  "Insert the whole suggestion."
  (interactive)
  (let ((text (ds4-suggestion)))
    (ds4-dismiss)                   ; also stops a suggestion still streaming: what is accepted is what was shown
    (when text
      (insert text))))                ; a change like any other: a new request follows as typing pauses

(defun ds4-accept-line ()
  "Insert the suggestion up to and including its next newline.
The rest stays shown."
  (interactive)
  (let* ((text (ds4-suggestion))
         (end (and text (1+ (or (cl-position ?\n text) (1- (length text)))))))
    (ds4-dismiss)
    (when text
      (let ((ds4--accepting t))
        (insert (substring text 0 end)))
      (when (< end (length text))
        (setq ds4--anchor (ds4--here))
        (ds4--show (substring text end))))))

(defun ds4--after-change (beg _end _len)
  (unless ds4--accepting
    (ds4-dismiss))
  (setq ds4--recent (cons (cons (current-buffer) beg) (assq-delete-all (current-buffer) ds4--recent)))
  (when (nthcdr 12 ds4--recent)         ; a few more than `ds4-context-buffers', so killed ones can be skipped
    (setcdr (nthcdr 11 ds4--recent) nil))
  (unless ds4--accepting
    (setq ds4--timer (run-with-timer ds4-delay nil #'ds4--auto (current-buffer)))))

(defvar ds4--retry-at 0 "With no daemon running, typing must not try a connect per keystroke.")
(defvar ds4-mode)

(defun ds4--auto (buffer)
  (when (and (eq buffer (current-buffer)) ds4-mode (not ds4--inflight) (>= (float-time) ds4--retry-at))
    (condition-case err
        (ds4-complete)
      (file-error (setq ds4--retry-at (+ (float-time) 5))
                  (message "ds4: cannot reach the daemon at %s: %s (is `ds4d serve' running?)"
                           (ds4-socket-path) (error-message-string err))))))

(defun ds4--post-command ()
  (when (and ds4--anchor (not (equal ds4--anchor (ds4--here))))
    (ds4-dismiss)))

;;;###autoload
(define-minor-mode ds4-mode
  "Completions from the ds4 daemon as you type, shown after point.
\\<ds4-suggestion-map>\\[ds4-accept] accepts, \\[ds4-accept-line] accepts a line, \\[ds4-dismiss] dismisses."
  :lighter " ds4"
  (if ds4-mode
      (progn (add-hook 'after-change-functions #'ds4--after-change nil t)
             (add-hook 'post-command-hook #'ds4--post-command nil t))
    (remove-hook 'after-change-functions #'ds4--after-change t)
    (remove-hook 'post-command-hook #'ds4--post-command t)
    (ds4-dismiss)))

;;;; Chat
;;
;; The buffer is a view of a daemon session: the session holds the conversation and its cached model state,
;; so a turn sends only the new user message.  The text under the last "## You" heading is the next message;
;; C-c C-c sends it and streams the answer below (thinking, if any, as a "> " quote); C-c C-k stops it.

(defconst ds4--you "## You")
(defconst ds4--model "## ds4")

(defvar-local ds4--session nil "The daemon session this chat buffer shows.")
(defvar-local ds4--chat-request nil "The msgid of the answer being streamed.")

(defvar ds4-chat-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "C-c C-c") #'ds4-chat-send)
    (define-key map (kbd "C-c C-k") #'ds4-chat-cancel)
    map))

(define-derived-mode ds4-chat-mode text-mode "ds4-chat"
  "A chat with the ds4 daemon, bound to a session.
\\{ds4-chat-mode-map}")

(defun ds4--chat-append (buffer text &optional quote)
  "Append TEXT at the end of BUFFER, starting each new line with QUOTE."
  (with-current-buffer buffer
    (save-excursion
      (goto-char (point-max))
      (insert (if quote (replace-regexp-in-string "\n" (concat "\n" quote) text t t) text)))))

(defun ds4--content-text (content)
  "A message's content: a string, or a vector of {type: \"text\", text} parts."
  (if (vectorp content)
      (mapconcat (lambda (part) (or (gethash "text" part) "")) content "")
    (or content "")))

(defun ds4-chat-send ()
  "Send the text under the last \"## You\" heading and stream the answer."
  (interactive)
  (let* ((buffer (current-buffer))
         (start (save-excursion
                  (goto-char (point-max))
                  (and (re-search-backward (concat "^" (regexp-quote ds4--you) "$") nil t) (line-end-position))))
         (text (and start (string-trim (buffer-substring-no-properties start (point-max)))))
         (kind nil))
    (when (and ds4--session (not ds4--chat-request) text (not (string-empty-p text)))
      (ds4--chat-append buffer (concat "\n\n" ds4--model "\n"))
      (setq ds4--chat-request
            (ds4-request
             "chat" (ds4--map "session" ds4--session
                              "messages" (vector (ds4--map "role" "user" "content" text))
                              "thinking" ds4-chat-thinking
                              "max_tokens" ds4-chat-max-tokens)
             (lambda (err result)
               (when (buffer-live-p buffer)
                 (with-current-buffer buffer
                   (setq ds4--chat-request nil))
                 (cond (err (ds4--chat-append buffer (format "\n\n_error: %s_" (gethash "message" err))))
                       ((not (member (gethash "finish_reason" result) '("eos" "stop")))
                        (ds4--chat-append buffer (format "\n\n_(%s)_" (gethash "finish_reason" result)))))
                 (ds4--chat-append buffer (concat "\n\n" ds4--you "\n"))
                 (with-current-buffer buffer
                   (goto-char (point-max)))))
             (lambda (event)
               (when (buffer-live-p buffer)
                 (pcase (gethash "kind" event)
                   ("reasoning" (ds4--chat-append buffer (concat (if (equal kind "reasoning") "" "> ")
                                                                 (gethash "text" event))
                                                  "> "))
                   ("content" (ds4--chat-append buffer (concat (if (equal kind "reasoning") "\n\n" "")
                                                               (gethash "text" event)))))
                 (unless (equal (gethash "kind" event) "progress")
                   (setq kind (gethash "kind" event))))))))))

(defun ds4-chat-cancel ()
  "Stop the answer being streamed."
  (interactive)
  (ds4-cancel ds4--chat-request))

;;;###autoload
(defun ds4-chat (&optional name)
  "Open a chat bound to the daemon session NAME and return its buffer.
A nil or empty NAME creates a new session."
  (interactive (list (read-string "ds4 session (empty: a new one): ")))
  (let* ((session (ds4-call "session.open" (ds4--map "name" (and name (not (string-empty-p name)) name))))
         (name (gethash "name" session))
         (buffer (get-buffer (format "*ds4 chat: %s*" name))))
    (unless buffer
      (setq buffer (get-buffer-create (format "*ds4 chat: %s*" name)))
      (with-current-buffer buffer
        (ds4-chat-mode)
        (setq ds4--session name))
      (ds4--chat-append buffer (concat "# ds4 chat: " name))
      (seq-doseq (m (gethash "messages" session))
        (let ((role (gethash "role" m))
              (reasoning (gethash "reasoning_content" m)))
          (when (member role '("user" "assistant"))
            (ds4--chat-append buffer (concat "\n\n" (if (equal role "user") ds4--you ds4--model) "\n"))
            (when (and (stringp reasoning) (not (string-empty-p reasoning)))
              (ds4--chat-append buffer (concat "> " reasoning) "> ")
              (ds4--chat-append buffer "\n\n"))
            (ds4--chat-append buffer (ds4--content-text (gethash "content" m))))))
      (ds4--chat-append buffer (concat "\n\n" ds4--you "\n")))
    (pop-to-buffer-same-window buffer)
    (goto-char (point-max))
    buffer))

(provide 'ds4)
;;; ds4.el ends here
