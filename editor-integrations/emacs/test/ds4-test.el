;;; ds4-test.el --- ERT tests of ds4.el  -*- lexical-binding: t -*-

;; The codec against byte strings from the msgpack spec (checked against Python's msgpack), and the
;; completion, cancellation and chat paths against a real daemon on $DS4_SOCKET (tests/test_editors.py
;; starts one):
;;   emacs --batch -Q -L editor-integrations/emacs -l editor-integrations/emacs/test/ds4-test.el \
;;         -f ert-run-tests-batch-and-exit

;;; Code:

(require 'ert)
(require 'ds4)

;;;; Helpers

(defun ds4-test--bytes (hex)
  "The unibyte string written as HEX."
  (apply #'unibyte-string
         (mapcar (lambda (i) (string-to-number (substring hex i (+ i 2)) 16))
                 (number-sequence 0 (1- (length hex)) 2))))

(defun ds4-test--hex (bytes)
  (mapconcat (lambda (b) (format "%02x" b)) bytes ""))

(defun ds4-test--equal (a b)
  "Structural equality that looks into hash tables and tells -0.0 from 0.0."
  (cond ((and (hash-table-p a) (hash-table-p b))
         (and (= (hash-table-count a) (hash-table-count b))
              (catch 'differ
                (maphash (lambda (k v) (unless (ds4-test--equal v (gethash k b 'missing)) (throw 'differ nil))) a)
                t)))
        ((and (vectorp a) (vectorp b))
         (and (= (length a) (length b)) (cl-every #'ds4-test--equal a b)))
        ((and (floatp a) (floatp b)) (eql a b))
        (t (equal a b))))

(defun ds4-test--roundtrip (value hex)
  (should (equal (ds4-test--hex (ds4-msgpack-encode value)) hex))
  (should (ds4-test--equal (ds4-msgpack-decode (ds4-test--bytes hex)) value)))

;;;; Codec

(ert-deftest ds4-test-codec-every-type ()
  (dolist (case `((0 "00") (127 "7f") (128 "cc80") (255 "ccff") (256 "cd0100") (65535 "cdffff")
                  (65536 "ce00010000") (,(1- (ash 1 32)) "ceffffffff") (,(ash 1 32) "cf0000000100000000")
                  (,(1- (ash 1 64)) "cfffffffffffffffff")
                  (-1 "ff") (-32 "e0") (-33 "d0df") (-128 "d080") (-129 "d1ff7f") (-32768 "d18000")
                  (-32769 "d2ffff7fff") (,(- (ash 1 31)) "d280000000") (,(- -1 (ash 1 31)) "d3ffffffff7fffffff")
                  (,(- (ash 1 63)) "d38000000000000000")
                  (nil "c0") (t "c3") (:false "c2")
                  (1.5 "cb3ff8000000000000") (-2.5 "cbc004000000000000") (0.1 "cb3fb999999999999a")
                  (-0.0 "cb8000000000000000") (1e300 "cb7e37e43c8800759c")
                  (1.7976931348623157e308 "cb7fefffffffffffff") (2.2250738585072014e-308 "cb0010000000000000")
                  (5e-324 "cb0000000000000001") (1.0e+INF "cb7ff0000000000000")
                  (-1.0e+INF "cbfff0000000000000") (0.0e+NaN "cb7ff8000000000000")
                  ("" "a0") ("héllo" "a668c3a96c6c6f") ("€𝄞" "a7e282acf09d849e")
                  (,(make-string 31 ?a) ,(concat "bf" (apply #'concat (make-list 31 "61"))))
                  (,(make-string 32 ?a) ,(concat "d920" (apply #'concat (make-list 32 "61"))))
                  ((:bin . "") "c400") ((:bin . "\x00\xff") "c40200ff")
                  ([] "90") ([1 [2]] "92019102") (,(ds4--map) "80") (,(ds4--map "a" 1) "81a16101")
                  (,(ds4--map "m" (vector 0 1 "complete"
                                          (vector (ds4--map "prefix" "x" "context"
                                                            (vector (ds4--map "path" "a.py" "text" "é"))))))
                   "81a16d940001a8636f6d706c6574659182a6707265666978a178a7636f6e746578749182a470617468a4612e7079a474657874a2c3a9")))
    (ds4-test--roundtrip (car case) (cadr case))))

(ert-deftest ds4-test-codec-16-and-32-bit-lengths ()
  (dolist (case `((,(make-string 256 ?b) "da0100") (,(make-string 65536 ?b) "db00010000")
                  ((:bin . ,(make-string 256 0)) "c50100") ((:bin . ,(make-string 65536 0)) "c600010000")
                  (,(make-vector 16 0) "dc0010") (,(make-vector 65536 0) "dd00010000")))
    (let ((bytes (ds4-msgpack-encode (car case))))
      (should (string-prefix-p (cadr case) (ds4-test--hex (substring bytes 0 5))))
      (should (ds4-test--equal (ds4-msgpack-decode bytes) (car case)))))
  (dolist (n '(16 65536))
    (let ((map (make-hash-table :test 'equal)))
      (dotimes (i n)
        (puthash i i map))
      (let ((bytes (ds4-msgpack-encode map)))
        (should (= (aref bytes 0) (if (= n 16) #xde #xdf)))
        (should (ds4-test--equal (ds4-msgpack-decode bytes) map))))))

(ert-deftest ds4-test-codec-decodes-float32-and-wide-encodings ()
  ;; The daemon's encoder picks the smallest form, but any valid encoding must decode.
  (dolist (case `(("ca3fc00000" 1.5) ("ca80000000" -0.0) ("ca7f800000" 1.0e+INF) ("caff800000" -1.0e+INF)
                  ("ca00000001" ,(ldexp 1.0 -149)) ("ca7fc00000" 0.0e+NaN)
                  ("cd0001" 1) ("d3ffffffffffffffff" -1) ("d07f" 127) ("d90161" "a") ("dc0000" [])
                  ("de0000" ,(ds4--map))))
    (should (ds4-test--equal (ds4-msgpack-decode (ds4-test--bytes (car case))) (cadr case))))
  (should-error (ds4-msgpack-decode (ds4-test--bytes "d40100")))      ; fixext: not part of the protocol
  (should-error (ds4-msgpack-decode (ds4-test--bytes "c0c0"))))       ; two values, not one

(ert-deftest ds4-test-codec-incremental ()
  (let ((bytes (ds4-msgpack-encode (vector 2 "stream" (vector (ds4--map "id" 7 "kind" "content" "text" "é"))))))
    (dotimes (i (length bytes))
      (should-not (ds4-msgpack-decode-prefix (substring bytes 0 i))))
    (let ((two (concat bytes (ds4-msgpack-encode 300))))
      (should (= (cdr (ds4-msgpack-decode-prefix two)) (length bytes)))
      (should (equal (ds4-msgpack-decode-prefix two (length bytes)) (cons 300 (length two)))))))

(ert-deftest ds4-test-socket-path-resolution ()
  (let ((runtime (make-temp-file "ds4-rt-" t))
        (process-environment (copy-sequence process-environment))
        (ds4-socket nil))
    (unwind-protect
        (progn
          (setenv "DS4_SOCKET" "/x/env.sock")
          (should (equal (let ((ds4-socket "/x/explicit.sock")) (ds4-socket-path)) "/x/explicit.sock"))
          (should (equal (ds4-socket-path) "/x/env.sock"))
          (setenv "DS4_SOCKET" nil)
          (setenv "XDG_RUNTIME_DIR" runtime)
          (should (equal (ds4-socket-path) (expand-file-name "ds4/ds4.sock" runtime)))
          (setenv "XDG_RUNTIME_DIR" (expand-file-name "missing" runtime))
          (should (equal (ds4-socket-path) (format "/tmp/ds4-%d/ds4.sock" (user-uid)))))
      (delete-directory runtime t))))

;;;; Against the daemon

(cl-defstruct ds4-test-req method params id err result done events)

(defvar ds4-test--sent nil "Every request sent while recording, most recent first.")

(defun ds4-test--recorder (send method params &optional on-done on-event)
  (let ((r (make-ds4-test-req :method method :params params)))
    (push r ds4-test--sent)
    (setf (ds4-test-req-id r)
          (funcall send method params
                   (lambda (err result)
                     (setf (ds4-test-req-err r) err (ds4-test-req-result r) result (ds4-test-req-done r) t)
                     (when on-done (funcall on-done err result)))
                   (lambda (event)
                     (setf (ds4-test-req-events r) (append (ds4-test-req-events r) (list event)))
                     (when on-event (funcall on-event event)))))))

(defmacro ds4-test--recording (&rest body)
  `(progn
     (skip-unless (getenv "DS4_SOCKET"))
     (setq ds4-test--sent nil)
     (advice-add 'ds4-request :around #'ds4-test--recorder)
     (unwind-protect (progn ,@body)
       (advice-remove 'ds4-request #'ds4-test--recorder))))

(defun ds4-test--last (method)
  (cl-find method ds4-test--sent :key #'ds4-test-req-method :test #'equal))

(defun ds4-test--wait (what condition &optional timeout)
  (with-timeout ((or timeout 30) (ert-fail (format "timed out waiting for %s" what)))
    (while (not (funcall condition))
      (accept-process-output nil 0.01))))

(defun ds4-test--result (req key)
  (gethash key (ds4-test-req-result req)))

(ert-deftest ds4-test-hello-and-errors ()
  (skip-unless (getenv "DS4_SOCKET"))
  (let ((hello (ds4-call "hello" (ds4--map "protocol" "1.0" "client" "ert"))))
    (should (equal (gethash "protocol" hello) "1.0"))
    (should (equal (gethash "quant" (gethash "model" hello)) "q2"))
    (should (eq (gethash "demo" (gethash "model" hello)) :false)))
  (let ((err (should-error (ds4-call "complete" (ds4--map "prefix" "x" "max_tokens" "many")))))
    (should (string-match-p "bad_request: max_tokens:" (cadr err)))))

(ert-deftest ds4-test-completion-overlay-and-accept ()
  (ds4-test--recording
   (with-temp-buffer
     (insert "def add(a, b):\n    return \n\nprint(add(1, 2))")
     (goto-char 27)
     (let ((ds4-max-tokens 8))
       (ds4-complete))
     (let ((r (ds4-test--last "complete")))
       (should (equal (gethash "prefix" (ds4-test-req-params r)) "def add(a, b):\n    return "))
       (should (equal (gethash "suffix" (ds4-test-req-params r)) "\n\nprint(add(1, 2))"))
       (ds4-test--wait "the completion" (lambda () (ds4-test-req-done r)))
       (should-not (ds4-test-req-err r))
       (let ((text (ds4-test--result r "text")))
         (should (> (length text) 0))
         (should (equal (gethash "kind" (car (ds4-test-req-events r))) "progress"))
         (should (equal (ds4-suggestion) text))
         (should (equal (overlay-start ds4--overlay) 27))
         (should (equal (substring-no-properties (overlay-get ds4--overlay 'after-string)) text))
         (ds4-accept)
         (should-not ds4--overlay)
         (should (equal (buffer-string) (concat "def add(a, b):\n    return " text "\n\nprint(add(1, 2))")))
         (should (= (point) (+ 27 (length text)))))))))

(ert-deftest ds4-test-an-edit-cancels-the-request-in-flight ()
  (ds4-test--recording
   (with-temp-buffer
     (ds4-mode 1)
     (insert "int main() {")
     (let ((ds4-max-tokens 2000))
       (ds4-complete))
     (let ((old (ds4-test--last "complete")))
       (ds4-test--wait "the first piece" #'ds4-suggestion)
       (insert "\n")                    ; the user types: ds4-mode cancels at once
       (should-not ds4--overlay)
       (let ((cancel (ds4-test--last "cancel")))
         (should (equal (gethash "id" (ds4-test-req-params cancel)) (ds4-test-req-id old)))
         (let ((ds4-max-tokens 4))
           (ds4-complete))
         (let ((new (ds4-test--last "complete")))
           (ds4-test--wait "the answers" (lambda () (and (ds4-test-req-done old) (ds4-test-req-done new)
                                                          (ds4-test-req-done cancel))))
           (should (equal (ds4-test--result old "finish_reason") "cancelled"))
           (should (< (gethash "completion_tokens" (ds4-test--result old "usage")) 2000))
           (should (eq (ds4-test--result cancel "cancelled") t))
           (should (member (ds4-test--result new "finish_reason") '("length" "eos")))))))))

(ert-deftest ds4-test-typing-in-ds4-mode-then-tab ()
  ;; The real command loop: keystrokes, the debounce timer, the request, the overlay's keymap.
  (ds4-test--recording
   (with-temp-buffer
     (switch-to-buffer (current-buffer))
     (ds4-mode 1)
     (let ((ds4-max-tokens 4)
           (ds4-delay 0.05))
       (execute-kbd-macro "x = ")
       (ds4-test--wait "a suggestion" #'ds4-suggestion)
       (should (= 1 (length (cl-remove "complete" ds4-test--sent :key #'ds4-test-req-method
                                       :test-not #'equal))))      ; the debounce made four keys one request
       (let ((text (ds4-suggestion)))
         (execute-kbd-macro (kbd "TAB"))
         (should (equal (buffer-string) (concat "x = " text))))))))

(ert-deftest ds4-test-accept-line-keeps-the-rest ()
  ;; A stand-in daemon answering with a fixed multi-line text.
  (cl-letf (((symbol-function 'ds4-request)
             (lambda (_method _params on-done on-event)
               (run-at-time 0 nil (lambda ()
                                    (funcall on-event (ds4--map "kind" "content" "text" "foo()\n  bar()\nbaz"))
                                    (funcall on-done nil (ds4--map "text" "foo()\n  bar()\nbaz"
                                                                   "finish_reason" "length"))))
               1)))
    (with-temp-buffer
      (insert "x = \nend")
      (goto-char 5)
      (ds4-complete)
      (ds4-test--wait "the suggestion" #'ds4-suggestion)
      (ds4-accept-line)
      (should (equal (buffer-string) "x = foo()\n\nend"))
      (should (equal (ds4-suggestion) "  bar()\nbaz"))
      (ds4-accept-line)
      (ds4-accept-line)
      (should (equal (buffer-string) "x = foo()\n  bar()\nbaz\nend"))
      (should-not (ds4-suggestion)))))

(ert-deftest ds4-test-chat-bound-to-a-session ()
  (skip-unless (getenv "DS4_SOCKET"))
  (ignore-errors (ds4-call "session.delete" (ds4--map "name" "emacs-test")))   ; left by an earlier run
  (let ((ds4-chat-max-tokens 6)
        (buffer (ds4-chat "emacs-test"))
        (expect nil))
    (with-current-buffer buffer
      (should (equal ds4--session "emacs-test"))
      (goto-char (point-max))
      (insert "Say hi.")
      (ds4-chat-send)
      (ds4-test--wait "the answer" (lambda () (null ds4--chat-request)))
      (let ((answer (gethash "content" (aref (gethash "messages" (ds4-call "session.history"
                                                                        (ds4--map "name" "emacs-test")))
                                             1))))
        (setq expect (concat "# ds4 chat: emacs-test\n\n## You\nSay hi.\n\n## ds4\n" answer))
        (should (string-prefix-p expect (buffer-string)))
        (should (string-suffix-p "\n\n## You\n" (buffer-string)))))
    (kill-buffer buffer)
    ;; Reopened, the buffer shows the session's stored conversation.
    (with-current-buffer (ds4-chat "emacs-test")
      (should (equal (buffer-string) (concat expect "\n\n## You\n")))
      (kill-buffer))))

;;; ds4-test.el ends here
